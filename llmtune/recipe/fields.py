"""Fields of installed dataclasses (TRL trainer configs, PEFT configs), read from source.

Recipe sections are passed straight to classes such as ``trl.SFTConfig`` and
``peft.LoraConfig``, so they are validated against those classes' real fields.
Importing the classes would pull in torch and transformers (seconds), which
``llmtune validate`` and ``--help`` cannot afford, so this module parses the
packages' source files with :mod:`ast` instead and imports none of them.
Standard library only.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import re
from dataclasses import dataclass, replace


class _Marker:
    """Stands in for a default that is not a plain literal; its repr says why."""

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


MISSING = _Marker("MISSING")  # no default: the constructor requires the field
FACTORY = _Marker("FACTORY")  # default_factory=...: built when the class is instantiated
COMPLEX = _Marker("COMPLEX")  # an expression (a name, a call) that only running the code could evaluate


@dataclass(frozen=True)
class FieldInfo:
    name: str
    annotation: str  # the annotation as source text (normalised by ast.unparse)
    default: object  # the literal default, or MISSING / FACTORY / COMPLEX
    help: str  # metadata["help"], "" if none
    choices: tuple | None  # metadata["choices"] when present and literal


def dataclass_fields(target: str) -> dict[str, FieldInfo]:
    """The constructor fields of the dataclass ``target``, in definition order.

    ``target`` is ``"package:Name"`` for a name the package exports (``"trl:SFTConfig"``)
    or ``"module.path:Name"``.  Inherited fields are included; a subclass field
    overrides the base field of the same name but keeps its position, as
    :func:`dataclasses.fields` does.  ``init=False`` fields are left out: a recipe
    cannot pass them to the constructor.
    """
    module, sep, name = target.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"expected 'module:ClassName', got {target!r}")
    found = _find_class(module, name) or _find_class_by_scanning(module, name)
    if found is None:
        raise LookupError(f"cannot find class {name} in the source of {module}")
    return _class_fields(*found)


def field_names(target: str) -> list[str]:
    """The names of the constructor fields of ``target`` (see :func:`dataclass_fields`)."""
    return list(dataclass_fields(target))


def check_value(info: FieldInfo, value) -> str | None:
    """None when the YAML-loaded ``value`` fits the field, else a short message.

    Lenient where unsure: annotation parts we cannot interpret (enums, config
    classes, unknown generics) accept anything.  A float given as text such as
    ``"1e-4"`` is accepted; :func:`coerce` converts it.
    """
    if _is_float_text_for(info, value) or _lone_item_for(info, value):
        return None
    if not _fits(_annotation_node(info.annotation), value):
        return f"expected {info.annotation}, got {_describe(value)}"
    if info.choices is not None and value is not None and value not in info.choices:
        close = difflib.get_close_matches(str(value), list(map(str, info.choices)), n=1, cutoff=0.6)
        return (f"did you mean {close[0]!r}? " if close else "") + "expected one of: " + ", ".join(map(repr, info.choices))
    return None


def coerce(info: FieldInfo, value):
    """``value`` converted to float when it is a float given as text, else unchanged.

    PyYAML follows YAML 1.1, which needs a dot in a float, so ``1e-4`` loads as
    the string ``"1e-4"``.
    """
    if _lone_item_for(info, value):
        return [value]
    return float(value) if _is_float_text_for(info, value) else value


def _lone_item_for(info: FieldInfo, value) -> bool:
    """A single value where the field takes a list (`loss_type: ipo`), as TRL's own parser accepts."""
    node = _annotation_node(info.annotation)
    return not isinstance(value, (list, tuple, dict)) and not _fits(node, value) and _fits(node, [value])


# --- locating and parsing source files ---------------------------------------


@functools.lru_cache(maxsize=None)
def _locate(module: str) -> tuple[str | None, tuple[str, ...]]:
    """(source file or None, package directories) of ``module``, found without importing it."""
    top, *rest = module.split(".")
    try:
        # Only ever a top-level name: find_spec on a dotted name imports the parent package.
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None, ()
    if spec is None:
        return None, ()
    # Built-in and frozen modules have no .py origin; extension modules have no source.
    origin = spec.origin if spec.origin and spec.origin.endswith(".py") else None
    dirs = tuple(spec.submodule_search_locations or ())
    for part in rest:
        origin, namespace_dirs = None, ()
        for directory in dirs:
            path = os.path.join(directory, part)
            if os.path.isfile(os.path.join(path, "__init__.py")):
                origin, dirs = os.path.join(path, "__init__.py"), (path,)
                break
            if os.path.isfile(path + ".py"):
                origin, dirs = path + ".py", ()
                break
            if os.path.isdir(path):  # part of a namespace package, which may span directories
                namespace_dirs += (path,)
        else:
            dirs = namespace_dirs
    return origin, dirs


def _parse(path: str) -> ast.Module:
    return _parse_version(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _parse_version(path: str, mtime_ns: int) -> ast.Module:
    # Keyed by mtime as well, so a package upgraded in a long-lived process is re-read.
    with open(path, "rb") as f:
        return ast.parse(f.read(), filename=path)


def _statements(body):
    """Statements of ``body``, including those nested in if/try/with blocks.

    Lazy ``__init__.py`` files import their names under ``if TYPE_CHECKING:``, and
    optional dependencies are imported under ``try:``; function and class bodies
    are not entered.
    """
    for stmt in body:
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try, ast.With, ast.ExceptHandler)):
            for block in ("body", "handlers", "orelse", "finalbody"):
                yield from _statements(getattr(stmt, block, ()))


def _tail(node) -> str | None:
    """The last name of ``a.b.C`` or ``C``; None for other expressions."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


# --- finding a class by following imports ------------------------------------


def _find_class(module: str, name: str, skip: ast.ClassDef | None = None, seen=frozenset()):
    """(defining module, ClassDef) of ``name`` as seen from ``module``, or None.

    ``skip`` is a class that must not be found itself: in ``class A(A)`` the base
    is an imported ``A``.  ``seen`` guards against import cycles.
    """
    if (module, name) in seen:
        return None
    seen = seen | {(module, name)}
    path, _ = _locate(module)
    if path is None:
        return None
    statements = list(_statements(_parse(path).body))
    is_package = os.path.basename(path) == "__init__.py"

    for stmt in statements:
        if isinstance(stmt, ast.ClassDef) and stmt.name == name and stmt is not skip:
            return module, stmt
    for stmt in statements:
        if isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (alias.asname or alias.name) == name:
                    source = _absolute(module, is_package, stmt.level, stmt.module)
                    found = _find_class(source, alias.name, seen=seen)
                    if found:
                        return found
    if is_package:
        # transformers-style lazy packages map submodules to exported names in a
        # dict literal (``_import_structure = {"training_args": ["TrainingArguments"]}``).
        for stmt in statements:
            if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Dict):
                for key, names in zip(stmt.value.keys, stmt.value.values):
                    if (
                        isinstance(key, ast.Constant)
                        and isinstance(key.value, str)
                        and isinstance(names, (ast.List, ast.Tuple, ast.Set))
                        and any(isinstance(n, ast.Constant) and n.value == name for n in names.elts)
                    ):
                        found = _find_class(f"{module}.{key.value}", name, seen=seen)
                        if found:
                            return found
    return None


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module named by ``from <level dots><target> import ...`` inside ``module``."""
    if level == 0:
        return target  # an absolute import always names its module
    parts = module.split(".")
    if not is_package:
        parts.pop()  # a plain module's relative imports start from its package
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


@functools.lru_cache(maxsize=None)
def _scanned_module(package: str, name: str) -> str | None:
    """The module under ``package`` whose source defines class ``name``, found by reading every file.

    Slow, hence cached and used only when the package's imports do not lead to the name.
    """
    _, dirs = _locate(package)
    needles = (f"class {name}(".encode(), f"class {name}:".encode())
    for directory in dirs:
        for root, subdirs, files in os.walk(directory):
            subdirs.sort()  # a deterministic answer when several files match
            for filename in sorted(files):
                if not filename.endswith(".py"):
                    continue
                path = os.path.join(root, filename)
                with open(path, "rb") as f:
                    source = f.read()
                if not any(needle in source for needle in needles):
                    continue
                parts = os.path.relpath(path, directory)[: -len(".py")].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                candidate = ".".join([package, *parts])
                found = _find_class(candidate, name)
                # The text may sit in a string or comment; only a real definition counts.
                if found and found[0] == candidate:
                    return candidate
    return None


def _find_class_by_scanning(package: str, name: str):
    module = _scanned_module(package, name)
    return _find_class(module, name) if module else None


# --- reading fields ------------------------------------------------------------


def _class_fields(module: str, cls: ast.ClassDef, chain: tuple = ()) -> dict[str, FieldInfo]:
    fields: dict[str, FieldInfo] = {}
    chain += ((module, cls.name),)
    # Later bases come first in the MRO's reverse, so earlier bases override them.
    # Bases that are not plain names (``nn.Module``, ``Generic[T]``) or that lead
    # nowhere (``object``, packages without source) contribute nothing.
    for base in reversed(cls.bases):
        if isinstance(base, ast.Name):
            found = _find_class(module, base.id, skip=cls)
            if found and (found[0], found[1].name) not in chain:
                fields.update(_class_fields(*found, chain))
    # Annotations of a class that is not itself a dataclass are not fields.
    if any(_tail(d.func if isinstance(d, ast.Call) else d) == "dataclass" for d in cls.decorator_list):
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign):
                name, info = _field_info(stmt)
                if name is None:
                    continue
                if info is None:
                    fields.pop(name, None)  # redeclared init=False: no longer a constructor argument
                    continue
                if info.choices is None:
                    info = replace(info, choices=_enum_choices(module, info.annotation))
                fields[name] = info  # an override keeps the inherited position, as in dataclasses
    return fields


# --- enums: `optim: OptimizerNames | str` takes the enum's values only -----------

_ENUM_BASES = {"Enum", "StrEnum", "IntEnum"}


def _enum_choices(module: str, annotation: str) -> tuple | None:
    """The values of the enum that a field's annotation names at its top level (`OptimizerNames | str`): the
    config class turns the text into that enum, refusing any other value. None where it names no strict enum."""
    for node in _union_members(_annotation_node(annotation)):
        name = _tail(node)
        found = _find_class(module, name) if name and name not in _PLAIN_CHECKS else None
        values = _enum_values(*found) if found else None
        if values:
            return values
    return None


def _union_members(node) -> list:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _union_members(node.left) + _union_members(node.right)
    if isinstance(node, ast.Subscript) and _tail(node.value) in ("Union", "Optional"):
        return node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    return [node]


def _enum_values(module: str, cls: ast.ClassDef) -> tuple | None:
    """A strict enum's member values in definition order; None for a class that is no enum, a member that is no
    literal, or a `_missing_` hook (in the class or an enum base) that might accept other values."""
    if not _strict_enum(module, cls):
        return None
    values = []
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                and not stmt.targets[0].id.startswith("_"):
            value = _literal(stmt.value)
            if value is COMPLEX:  # auto(), a computed value
                return None
            values.append(value)
    return tuple(values)


def _strict_enum(module: str, cls: ast.ClassDef, seen=frozenset()) -> bool:
    """Whether `cls` is an Enum (by its bases, followed through imports) whose `_missing_` hooks only raise."""
    if (module, cls.name) in seen:
        return False
    for stmt in cls.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "_missing_" and not all(
                isinstance(s, ast.Raise) or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
                for s in stmt.body):
            return False
    enum = False
    for base in cls.bases:
        name = _tail(base)
        if name in _ENUM_BASES:
            enum = True
        elif isinstance(base, ast.Name):
            found = _find_class(module, name, skip=cls)
            if found and _strict_enum(*found, seen | {(module, cls.name)}):
                enum = True
    return enum


_CLASSVAR = re.compile(r"(typing\.)?ClassVar\b")


def _field_info(stmt: ast.AnnAssign) -> tuple[str | None, FieldInfo | None]:
    """(name, FieldInfo) of a class-level ``name: T [= value]``.

    The name is None when the statement is no public field at all; the info is
    None for an ``init=False`` field, which also hides an inherited one.
    """
    if not isinstance(stmt.target, ast.Name) or stmt.target.id.startswith("_"):
        return None, None
    name = stmt.target.id
    annotation = stmt.annotation
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        text = annotation.value  # a quoted forward reference
    else:
        text = ast.unparse(annotation)
    if _CLASSVAR.match(text):
        return None, None

    default, metadata = MISSING, None
    value = stmt.value
    if isinstance(value, ast.Call) and _tail(value.func) == "field":
        keywords = {k.arg: k.value for k in value.keywords if k.arg}
        if _literal(keywords.get("init")) is False:
            return name, None
        if "default" in keywords:
            default = _literal(keywords["default"])
        elif "default_factory" in keywords:
            default = FACTORY
        metadata = keywords.get("metadata")
    elif value is not None:
        default = _literal(value)

    help_text, choices = "", None
    if isinstance(metadata, ast.Dict):
        for key_node, item in zip(metadata.keys, metadata.values):
            key = _literal(key_node) if key_node is not None else None  # None: a ``**other`` entry
            if key == "help":
                help_text = _string(item) or ""
            elif key == "choices":
                literal = _literal(item)
                choices = tuple(literal) if isinstance(literal, (list, tuple)) else None
    return name, FieldInfo(name, text, default, help_text, choices)


def _literal(node):
    """The value of a literal expression, else COMPLEX (MISSING for no expression)."""
    if node is None:
        return MISSING
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return COMPLEX


def _string(node) -> str | None:
    """A string constant, also when written as ``"a" + "b"``; None for anything else.

    Adjacent and parenthesised literals are already joined by the parser.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left), _string(node.right)
        return None if left is None or right is None else left + right
    return None


# --- checking values against annotations --------------------------------------


@functools.lru_cache(maxsize=1024)
def _annotation_node(text: str):
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError:
        return None  # matches nothing in _fits, so accepts anything


def _is_int(value) -> bool:
    # bool is a subclass of int, but a YAML true/false is never meant as 1/0.
    return isinstance(value, int) and not isinstance(value, bool)


_PLAIN_CHECKS = {
    "int": _is_int,
    "float": lambda v: _is_int(v) or isinstance(v, float),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "NoneType": lambda v: v is None,
}
_MAPPINGS = {"dict", "Dict", "Mapping", "MutableMapping"}
# YAML has one sequence type, which loads as a list, whatever the annotation says.
_SEQUENCES = {"list", "List", "tuple", "Tuple", "set", "Set", "frozenset", "FrozenSet", "Sequence"}
_TUPLES = {"tuple", "Tuple"}


def _fits(node, value) -> bool:
    """Whether ``value`` fits the annotation expression ``node``; what we cannot interpret fits."""
    if isinstance(node, ast.Constant):
        if node.value is None:
            return value is None
        if isinstance(node.value, str):  # a quoted forward reference
            return _fits(_annotation_node(node.value), value)
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _fits(node.left, value) or _fits(node.right, value)
    if isinstance(node, ast.Subscript):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return _fits_generic(_tail(node.value), args, value)
    name = _tail(node)
    if name in _MAPPINGS:
        return isinstance(value, dict)
    if name in _SEQUENCES:
        return isinstance(value, (list, tuple))
    check = _PLAIN_CHECKS.get(name)
    return check is None or check(value)


def _fits_generic(origin: str | None, args: list, value) -> bool:
    if origin in ("Optional", "Union"):
        return (origin == "Optional" and value is None) or any(_fits(a, value) for a in args)
    if origin == "Annotated":
        return _fits(args[0], value)
    if origin == "Literal":
        return _fits_literal(args, value)
    if origin in _MAPPINGS:
        return isinstance(value, dict) and (
            len(args) != 2 or all(_fits(args[0], k) and _fits(args[1], v) for k, v in value.items())
        )
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        variadic = len(args) == 2 and isinstance(args[1], ast.Constant) and args[1].value is Ellipsis
        if origin in _TUPLES and not variadic:
            return len(args) == len(value) and all(map(_fits, args, value))
        return all(_fits(args[0], item) for item in value)
    return True


def _fits_literal(args: list, value) -> bool:
    options = [_literal(a) for a in args]
    if COMPLEX in options:
        return True
    for option in options:
        if isinstance(option, str) and "[" in option and isinstance(value, str):
            # peft spells a family of values as one placeholder, e.g. 'pissa_niter_[number of iters]'.
            if value.startswith(option.partition("[")[0]):
                return True
        elif type(option) is type(value) and option == value:  # type check: True must not match 1
            return True
    return False


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", re.ASCII)


def _is_float_text_for(info: FieldInfo, value) -> bool:
    """Whether ``value`` is a number written as text that the field takes only as a number."""
    if not (isinstance(value, str) and _FLOAT_TEXT.fullmatch(value)):
        return False
    node = _annotation_node(info.annotation)
    return not _fits(node, value) and _fits(node, float(value))


def _describe(value) -> str:
    if value is None:
        return "None"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
