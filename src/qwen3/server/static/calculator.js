// The calculator tool the shipped tiny model was trained with (qwen3.agent.calculator), run in the
// browser: a tokenizer and a recursive-descent parser for numbers, + - * / // % ** ^ and parentheses,
// never eval (the arguments are model output). Integers are exact (BigInt) and the result is written as
// Python's calculator writes it, so the model reads the same text it was trained on.

export const CALCULATOR_TOOL = {
  type: "function",
  function: {
    name: "calculator",
    description: "Evaluate an arithmetic expression",
    parameters: { type: "object", properties: { expression: { type: "string" } }, required: ["expression"] },
  },
};

const MAX_LENGTH = 1000;
const MAX_DEPTH = 100;
const TOKEN = /\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\*\*|\/\/|[-+*/%^×()])/y;

function tokenize(expression) {
  const tokens = [];
  TOKEN.lastIndex = 0;
  while (TOKEN.lastIndex < expression.length) {
    const start = TOKEN.lastIndex;
    const match = TOKEN.exec(expression);
    if (!match) {
      if (!expression.slice(start).trim()) break;
      throw new Error(`not an arithmetic expression: ${JSON.stringify(expression)}`);
    }
    const token = match[1];
    tokens.push(token === "^" ? "**" : token === "×" ? "*" : token);
  }
  return tokens;
}

const isInt = (value) => typeof value === "bigint";
const toFloat = (value) => (isInt(value) ? Number(value) : value);

function binary(op, a, b) {
  if (op === "/") {
    if (toFloat(b) === 0) throw new Error("division by zero");
    return toFloat(a) / toFloat(b);
  }
  if (op === "**" && Math.abs(toFloat(b)) > 100) throw new Error("exponent too large");
  if ((op === "//" || op === "%") && toFloat(b) === 0) throw new Error("integer division or modulo by zero");
  if (isInt(a) && isInt(b) && !(op === "**" && b < 0n)) {
    switch (op) {
      case "+": return a + b;
      case "-": return a - b;
      case "*": return a * b;
      case "**": return a ** b;
      case "//": return a / b - ((a % b !== 0n && (a < 0n) !== (b < 0n)) ? 1n : 0n);
      case "%": { const r = a % b; return r !== 0n && (r < 0n) !== (b < 0n) ? r + b : r; }
    }
  }
  const x = toFloat(a);
  const y = toFloat(b);
  switch (op) {
    case "+": return x + y;
    case "-": return x - y;
    case "*": return x * y;
    case "**": return x ** y;
    case "//": return Math.floor(x / y);
    case "%": return x - y * Math.floor(x / y);
  }
  throw new Error(`unknown operator ${op}`);
}

/** The value of an arithmetic expression: a BigInt for integer arithmetic, else a Number. */
export function evaluate(expression) {
  if (typeof expression !== "string" || expression.length > MAX_LENGTH) {
    throw new Error("the expression must be a string of at most 1000 characters");
  }
  const tokens = tokenize(expression);
  let position = 0;
  const peek = () => tokens[position];
  const fail = () => {
    throw new Error(`not an arithmetic expression: ${JSON.stringify(expression)}`);
  };
  const sum = (depth) => {
    let value = product(depth);
    while (peek() === "+" || peek() === "-") value = binary(tokens[position++], value, product(depth));
    return value;
  };
  const product = (depth) => {
    let value = unary(depth);
    while (["*", "/", "//", "%"].includes(peek())) value = binary(tokens[position++], value, unary(depth));
    return value;
  };
  const unary = (depth) => {
    if (depth > MAX_DEPTH) throw new Error("the expression is nested too deeply");
    if (peek() === "-" || peek() === "+") {
      const sign = tokens[position++];
      const value = unary(depth + 1);
      return sign === "-" ? -value : value;
    }
    return power(depth);
  };
  const power = (depth) => {
    const base = atom(depth);
    if (peek() === "**") {
      position += 1;
      return binary("**", base, unary(depth + 1));
    }
    return base;
  };
  const atom = (depth) => {
    const token = tokens[position++];
    if (token === "(") {
      const value = sum(depth + 1);
      if (tokens[position++] !== ")") fail();
      return value;
    }
    if (token === undefined || !/^[\d.]/.test(token)) fail();
    return /[.eE]/.test(token) ? Number(token) : BigInt(token);
  };
  const value = sum(0);
  if (position !== tokens.length) fail();
  if (!isInt(value) && !Number.isFinite(value)) throw new Error("the result is not a finite number");
  return value;
}

/** Python's str() of a float, for the cases JavaScript writes differently. */
function pythonFloat(value) {
  const small = value !== 0 && Math.abs(value) < 1e-4; // Python switches to exponents below 1e-4
  const text = small ? value.toExponential() : String(value);
  if (/e/.test(text)) return text.replace(/e([+-])(\d)$/, "e$10$2");
  return text;
}

/** Run the tool on the model's JSON arguments; errors become the reply, as qwen3.agent's tools do. */
export function runCalculator(argumentsJson) {
  try {
    const args = JSON.parse(argumentsJson || "{}");
    if (!args || typeof args !== "object" || Array.isArray(args)) throw new Error("arguments must be a JSON object");
    const value = evaluate(args.expression);
    if (isInt(value)) return value.toString();
    return Number.isInteger(value) ? BigInt(value).toString() : pythonFloat(value);
  } catch (error) {
    return `Error: ${error.message}`;
  }
}
