"""Go's text/template, the subset `llmtune.tools.ollama` emits, to check Modelfile templates without Ollama.

Text and actions with `{{-`/`-}}` trimming; `range $i, $_ := PIPE`, `if`/`else if`/`else`/`end`;
`$x := PIPE`; pipes of `.Field`, `$.Field`, `$var`, string and integer literals, parentheses (and
`(PIPE).Field`) and the functions eq, ne, not, and, len, slice, index. Anything else raises, so an
unexpected construct in the emitted template fails the test instead of being skipped.
"""

import re

ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
TOKEN = re.compile(r'\s*(\(|\)|"(?:[^"\\]|\\.)*"|-?\d+|\$?[\w.$]+)')


def parse(source: str) -> list:
    """A tree: strings for text, ('out', expr), ('set', name, expr), ('if', [(cond, body)], else_body),
    ('range', (index, value), expr, body)."""
    parts, at, trim_next = [], 0, False
    for match in ACTION.finditer(source):
        text = source[at:match.start()]
        text = text.lstrip() if trim_next else text
        parts += [text.rstrip() if match.group(1) else text, ("action", match.group(2))]
        trim_next, at = bool(match.group(3)), match.end()
    parts.append(source[at:].lstrip() if trim_next else source[at:])
    return _block(iter(parts), top=True)[0]


def _block(parts, top=False):
    body = []
    for part in parts:
        if isinstance(part, str):
            body.append(part)
            continue
        words = part[1]
        if words in ("end", "else") or words.startswith("else if "):
            if top:
                raise SyntaxError(f"unexpected {{{{ {words} }}}}")
            return body, words
        if words.startswith("if "):
            branches, cond, otherwise = [], _expr(words[3:]), []
            while True:
                inner, closer = _block(parts)
                branches.append((cond, inner))
                if closer == "end":
                    break
                if closer == "else":
                    otherwise, closer = _block(parts)
                    assert closer == "end"
                    break
                cond = _expr(closer[len("else if "):])
            body.append(("if", branches, otherwise))
        elif m := re.fullmatch(r"range (\$\w+), (\$\w+) := (.*)", words):
            inner, closer = _block(parts)
            assert closer == "end"
            body.append(("range", (m.group(1), m.group(2)), _expr(m.group(3)), inner))
        elif m := re.fullmatch(r"(\$\w+) := (.*)", words):
            body.append(("set", m.group(1), _expr(m.group(2))))
        else:
            body.append(("out", _expr(words)))
    if not top:
        raise SyntaxError("missing {{ end }}")
    return body, None


def _expr(text: str):
    tokens = [t for t in TOKEN.findall(text)]
    if "".join(tokens).replace(" ", "") != text.replace(" ", ""):
        raise SyntaxError(f"unsupported pipe: {text}")
    node, rest = _command(tokens)
    assert not rest, text
    return node


def _command(tokens):
    """A command: an operand, or a function applied to the operands that follow, up to ')' or the end."""
    args = []
    while tokens and tokens[0] != ")":
        token, tokens = tokens[0], tokens[1:]
        if token == "(":
            inner, tokens = _command(tokens)
            tokens = tokens[1:]  # ')'
            if tokens and tokens[0].startswith("."):  # (index .Messages 0).Role
                inner, tokens = ("chain", inner, tokens[0][1:].split(".")), tokens[1:]
            args.append(inner)
        else:
            args.append(("lit", token))
    if len(args) == 1:
        return args[0], tokens
    return ("call", args[0][1], args[1:]), tokens


FUNCS = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "not": lambda a: not a, "len": len,
         "slice": lambda seq, i: seq[i:], "index": lambda seq, i: seq[i]}


def _unescape(match) -> str:
    code = match.group(1)
    return chr(int(code[1:], 16)) if len(code) > 1 else {"n": "\n", "t": "\t", "r": "\r"}.get(code, code)


def _value(node, dot, scope):
    if node[0] == "call":
        if node[1] == "and":  # Go 1.18+: stops at the first false operand
            result = True
            for arg in node[2]:
                result = _value(arg, dot, scope)
                if not result:
                    return result
            return result
        return FUNCS[node[1]](*(_value(arg, dot, scope) for arg in node[2]))
    if node[0] == "chain":
        value = _value(node[1], dot, scope)
        for field in node[2]:
            value = value[field]
        return value
    token = node[1]
    if token.startswith('"'):
        return re.sub(r"\\(U[0-9a-f]{8}|u[0-9a-f]{4}|.)", _unescape, token[1:-1], flags=re.I)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    base, *fields = token.split(".")
    value = dot if base == "" else scope[base]
    for field in fields:
        value = value[field]
    return value


def _run(body, dot, scope, out):
    for node in body:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "out":
            out.append(str(_value(node[1], dot, scope)))
        elif node[0] == "set":
            scope[node[1]] = _value(node[2], dot, scope)
        elif node[0] == "if":
            for cond, inner in node[1]:
                if _value(cond, dot, scope):
                    _run(inner, dot, dict(scope), out)
                    break
            else:
                _run(node[2], dot, dict(scope), out)
        elif node[0] == "range":
            for i, item in enumerate(_value(node[2], dot, scope)):
                _run(node[3], item, {**scope, node[1][0]: i, node[1][1]: item}, out)


def execute(source: str, data: dict) -> str:
    """Render `source` with `data` (Ollama passes Messages as a list of {Role, Content})."""
    out = []
    _run(parse(source), data, {"$": data}, out)
    return "".join(out)
