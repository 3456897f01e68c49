"""
The configuration and its command line, apart from the method (nanoGPT keeps these in configurator.py, here without
exec). This module owns:

- config fields: a dataclass field declares its valid values once, beside it (`spec`: an interval, choices, the
  choices of each comma-separated item, or a check such as `is_device`); one validator (`validate`) applies them;
- presets: `config = dict(key=value, ...)` files in config/, read with `ast` and never executed (`load_preset`);
- flags: `--key=value` parsed against the field's type (`parse_args`, `parse_config`); an unknown option names the
  closest valid one, a flag given twice is an error; `--help` / `-h` prints the usage part of the entry point's
  docstring and every option with its type, default, valid values and meaning, grouped as the dataclass groups
  them (`help_text`, read from the dataclass source, so it cannot drift from the fields);
- errors: ConfigError (entry.py's `cli` says one as a single `error: ...` line) and HelpRequested;
- environment variables: each one the project reads declares its valid values once (`ENVIRONMENT`), read through
  `environment`; torchrun's are checked together (`torchrun_ranks`), by `cli` before any entry point runs.

It imports no other module of this project.
"""

import ast
import dataclasses
import difflib
import inspect
import io
import math
import os
import re
import textwrap
import tokenize
import typing

import torch


class ConfigError(ValueError):
    """A bad input: the message names the problem and the fix. `cli` prints it as one `error:` line."""


class HelpRequested(Exception):
    """`-h` or `--help` among the arguments: `cli` prints `help_text` for these dataclasses and exits with 0."""

    def __init__(self, classes):
        super().__init__("--help")
        self.classes = classes


# ---------------------------------------------------------------------------------------------- config fields
_RULE = re.compile(r"^\s*(?:(>=|>|<=|<)\s*(\S+)|([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])]))\s*$")


def spec(default, rule=None, *, each=None, empty_ok=False, check=None):
    """A dataclass field with its valid values beside it, checked by `validate`.

    rule: an interval such as ">= 1", "> 0", "[0, 1)", or a tuple of choices. each: the choices of every item of a
    comma-separated string, which names at least one unless empty_ok. check: a function of the value that returns a string saying what is wrong with it (or
    raises a ConfigError), anything else when it is fine."""
    meta = {"check": check, "each": each, "empty_ok": empty_ok}
    if isinstance(rule, tuple):
        meta["choices"] = rule
    elif rule is not None:
        m = _RULE.match(rule)
        if not m:
            raise ValueError(f"bad rule {rule!r}")
        op, x, lb, lo, hi, rb = m.groups()
        if op:
            lo, hi, lb, rb = (x, "inf", "[" if op == ">=" else "(", ")") if ">" in op else \
                ("-inf", x, "(", "]" if op == "<=" else ")")
        meta["interval"] = (float(lo), lb == "[", float(hi), rb == "]", rule)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(typ):
    """(type, optional) of a field annotation: Optional[X] -> (X, True)."""
    if typing.get_origin(typ) is typing.Union:
        return [t for t in typing.get_args(typ) if t is not type(None)][0], True
    return typ, False


def _typed(key, value, annotation):
    """value as the field's type (an int given for a float becomes a float), or a ConfigError."""
    typ, optional = _base_type(annotation)
    if value is None and optional:
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{key}={value!r}: expected {typ.__name__}, got {type(value).__name__}")
    return value


def validate(cfg):
    """Check every field of the dataclass instance against its type and its `spec`; raise ConfigError naming the
    field, the value and the fix. Ints given for float fields become floats. Called by each config's __post_init__."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f.name
        value = _typed(key, getattr(cfg, key), hints[key])
        setattr(cfg, key, value)
        if value is None:
            continue
        typ = type(value)
        if typ is float and not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number: pass --{key}=X with a finite X")
        m = f.metadata
        if "interval" in m:
            lo, lo_in, hi, hi_in, rule = m["interval"]
            if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
                within = f"in {rule}" if rule[0] in "[(" else rule
                raise ConfigError(f"{key}={value} is out of range: it must be {within} (pass --{key}=X with X {within})")
        if "choices" in m and value not in m["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(repr, m['choices']))}: pick one")
        if m.get("each"):
            if not split_list(value) and not m["empty_ok"]:
                raise ConfigError(f"{key}={value!r} names nothing: pick at least one of {', '.join(m['each'])}")
            bad = [v for v in split_list(value) if v not in m["each"]]
            if bad:
                raise ConfigError(f"{key}={value!r}: {', '.join(map(repr, bad))} not among {', '.join(m['each'])}: "
                                  "pick from those (comma-separated)")
        problem = m["check"](value) if m.get("check") else None  # a check may also raise a ConfigError itself
        if isinstance(problem, str):
            raise ConfigError(f"{key}={value!r} {problem}")


def split_list(text):
    """"a, b,,c" -> ["a", "b", "c"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def is_digits(text):
    """Whether `text` is one or more ASCII digits 0-9: the test for every number a user types. str.isdigit alone
    also takes "²" (which int() then refuses) and other scripts' digits ("١٢", which int() reads as 12)."""
    return text.isascii() and text.isdigit()


def is_index_list(text):
    """A field check (spec's `check`): a comma-separated list of indices, e.g. "0,1" ("" is the empty list)."""
    ok = all(is_digits(i) for i in split_list(text))
    return None if ok else "is not a comma-separated list of layer indices: e.g. --codebook_layers=0,1"


def build(cls, values, what=None):
    """cls(**values) with unknown keys and bad values as ConfigError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}{' in ' + what if what else ''}: see {cls.__name__}")
    return cls(**values)


# checks for `spec(check=...)`
def is_regex(value):
    try:
        re.compile(value)
    except re.error as e:
        return f"is not a valid regular expression ({e}): fix the pattern"
    return None


def is_device(name):
    """None if torch can use the device `name` here ("auto", "cpu", "cuda", "cuda:1", "mps"), else the problem."""
    cuda = ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    avail = ["auto", "cpu", *cuda] + (["mps"] if torch.backends.mps.is_available() else [])
    return None if name in avail else f"is not available here: use one of {', '.join(avail)}"


def device_of(name):
    """The torch device for a validated device name: "auto" is CUDA when present, else the CPU."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def autocast_for(device, dtype="auto"):
    """bf16 autocast on CUDA for "auto" or "bfloat16", a disabled autocast otherwise."""
    kind = torch.device(device).type
    on = dtype == "bfloat16" or (dtype == "auto" and kind == "cuda")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16, enabled=on)


def is_out_dir(path):
    """None if `path` can be an output directory (it may not exist yet), else the problem."""
    if not path.strip():
        return "is empty: name a directory"
    if os.path.exists(path) and not os.path.isdir(path):
        return "is a file, not a directory: name a directory"
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"lies under {parent}, which is a file, not a directory: choose a place under a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created or written ({parent} is not a writable directory): choose a writable place"
    return None

# ---------------------------------------------------------------------------------------------- environment
def _integer(lo, hi=None):
    def parse(text):
        value = int(text) if is_digits(text) else None
        return value if value is not None and value >= lo and (hi is None or value <= hi) else None
    return parse


def _bytes(text):
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


# every environment variable the project reads: (its valid values in words, an example, text -> value or None)
ENVIRONMENT = {
    "RANK": ("an integer >= 0, below WORLD_SIZE", "0", _integer(0)),  # torchrun sets these six
    "WORLD_SIZE": ("an integer >= 1", "1", _integer(1)),
    "LOCAL_RANK": ("an integer >= 0, below LOCAL_WORLD_SIZE", "0", _integer(0)),
    "LOCAL_WORLD_SIZE": ("an integer >= 1, at most WORLD_SIZE", "1", _integer(1)),
    "MASTER_ADDR": ("a host name or address", "localhost", lambda t: t if t and not any(c.isspace() for c in t)
                    else None),
    "MASTER_PORT": ("a port number in [1, 65535]", "29500", _integer(1, 65535)),
    "CODEBOOK_MEMORY_LIMIT": ("a finite number of bytes > 0", "8e9", _bytes),  # memory.py's limit
    "CODEBOOK_PROGRESS": ("0 or 1", "1", lambda t: {"0": False, "1": True}.get(t)),  # progress bars off or on
}
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def environment(name, default=None):
    """The value of the environment variable `name` (one of ENVIRONMENT), parsed, or `default` where it is unset or
    empty. Raises ConfigError naming the variable, its valid values and the fix."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    valid, example, parse = ENVIRONMENT[name]
    value = parse(text)
    if value is None:
        launched = " (torchrun sets it: launch with torchrun, not by hand)" if name in TORCHRUN else ""
        raise ConfigError(f"the environment variable {name}={text!r} is not {valid}: set it to e.g. {example}, or "
                          f"unset it{launched}")
    return value


def torchrun_ranks():
    """(RANK, WORLD_SIZE) of a process that torchrun started, or (None, 1) where RANK is unset. Checks every variable
    of ENVIRONMENT, torchrun's as a whole: all set together, each rank below its size. Raises ConfigError."""
    values = {name: environment(name) for name in ENVIRONMENT}
    given = [name for name in TORCHRUN if values[name] is not None]
    if values["RANK"] is None and not ({"WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"} & set(given)):
        return None, 1
    if len(given) < len(TORCHRUN):
        missing = ", ".join(n for n in TORCHRUN if n not in given)
        raise ConfigError(f"the environment sets {', '.join(given)} but not {missing}: torchrun sets them all; "
                          f"unset {', '.join(given)} to run one process, or launch with torchrun")
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "LOCAL_WORLD_SIZE"), ("LOCAL_WORLD_SIZE", "WORLD_SIZE")):
        if values[rank] >= values[size] + (rank == "LOCAL_WORLD_SIZE"):
            below = "at most" if rank == "LOCAL_WORLD_SIZE" else "below"
            raise ConfigError(f"the environment variable {rank}={values[rank]} is not {below} {size}={values[size]}: "
                              "launch with torchrun, which sets them together, not by hand")
    return values["RANK"], values["WORLD_SIZE"]


# ---------------------------------------------------------------------------------------------- presets and flags
def load_preset(path):
    """The `config` dict of a preset (config/*.py): `config = dict(key=value, ...)` or `config = {...}` with literal
    values, read with ast and never executed. Raises ConfigError for anything else."""
    if not path.endswith(".py"):
        raise ConfigError(f"{path}: presets are .py files holding `config = dict(...)`; flags are --key=value")
    text = read_text(path, "preset")
    try:
        tree = ast.parse(text, path)
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}: fix the preset's Python syntax") from None
    config = None
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if not (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["config"]):
            raise ConfigError(f"{path}:{node.lineno}: a preset holds only `config = dict(key=value, ...)`: "
                              "move other code out of it")
        v = node.value
        if isinstance(v, ast.Call) and getattr(v.func, "id", None) == "dict" and not v.args:
            items = [(kw.arg, kw.value) for kw in v.keywords]
        elif isinstance(v, ast.Dict) and all(isinstance(k, ast.Constant) for k in v.keys):
            items = [(k.value, x) for k, x in zip(v.keys, v.values)]
        else:
            raise ConfigError(f"{path}:{node.lineno}: `config` must be dict(key=value, ...) or a {{...}} literal")
        config = {}
        for key, x in items:
            try:
                config[key] = ast.literal_eval(x)
            except ValueError:
                raise ConfigError(f"{path}:{x.lineno}: the value of {key!r} is not a literal (a number, string, "
                                  "bool or None): write the value itself") from None
    if config is None:
        raise ConfigError(f"{path} defines no `config`: write config = dict(key=value, ...)")
    return config


def _parse_value(key, text, typ):
    typ, optional = _base_type(typ)
    if optional and text.lower() == "none":
        return None
    if typ is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ConfigError(f"--{key}={text}: expected true or false")
    if typ in (int, float) and not (is_digits(text.lstrip("+-")) if typ is int else text.isascii() and "_" not in text):
        raise ConfigError(f"--{key}={text}: expected {typ.__name__}, written in ASCII digits")
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"--{key}={text}: expected {typ.__name__}") from None


def check_help(argv, classes):
    """Raise HelpRequested (for `cli`) if `-h` or `--help` is among argv."""
    if "-h" in argv or "--help" in argv:
        raise HelpRequested(classes)


def _unknown(key, keys, names, where=""):
    """The ConfigError of an unknown option: the closest valid one (difflib), the dataclasses that hold the keys."""
    close = difflib.get_close_matches(key, keys, n=1)
    if where:
        return ConfigError(f"unknown config key {key!r} in {where}" + (f": did you mean {close[0]!r}?" if close else "")
                           + f" (see {names})")
    return ConfigError(f"unknown option --{key}" + (f": did you mean --{close[0]}?" if close else "") +
                       f" (no key {key!r} in {names}; --help lists them)")


def parse_args(argv, classes):
    """argv -> (values from the preset files, values from --key=value), both dicts of the fields of the
    dataclasses `classes`. Raises HelpRequested for -h or --help, and ConfigError for unknown keys (naming the
    closest valid one), a flag given twice, malformed arguments and values of the wrong type."""
    check_help(argv, classes)
    types = {k: t for c in classes for k, t in typing.get_type_hints(c).items()}
    names = " and ".join(c.__name__ for c in classes)
    preset, flags = {}, {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in load_preset(arg).items():
                if key not in types:
                    raise _unknown(key, types, names, arg)
                preset[key] = _typed(key, value, types[key])
            continue
        if "=" not in arg:
            raise ConfigError(f"{arg}: write overrides as --key=value")
        key, text = arg[2:].split("=", 1)
        if key not in types:
            raise _unknown(key, types, names)
        if key in flags:
            raise ConfigError(f"--{key} is given twice (again as {arg}): give it once")
        flags[key] = _parse_value(key, text, types[key])
    return preset, flags


def split_config(values, *classes):
    """A flat dict -> one dict per dataclass, by field name (the first class that has the field)."""
    out, seen = [], set()
    for c in classes:
        names = {f.name for f in dataclasses.fields(c)} - seen
        out.append({k: v for k, v in values.items() if k in names})
        seen |= names
    return out


def parse_config(argv, cls):
    """The one-dataclass entry points (sample, analyze, steer, bench): presets and flags -> a validated cls."""
    preset, flags = parse_args(argv, (cls,))
    return cls(**{**preset, **flags})


def resume_config(stored, given, resumable, where):
    """The config of a resumed run: `stored` (the checkpoint's values) with the `given` ones (presets and flags)
    that differ applied only where the key is in `resumable`. Raises ConfigError naming what may not change."""
    changed = sorted(k for k, v in given.items() if k in stored and stored[k] != v and k not in resumable)
    if changed:
        raise ConfigError(f"cannot change {', '.join(changed)} when resuming {where} (its data, model or place "
                          f"would change): drop them, or start a new out_dir; a resume may change "
                          f"{', '.join(resumable)}")
    return {**stored, **{k: v for k, v in given.items() if k in resumable}}


# ---------------------------------------------------------------------------------------------- files from users
def read_text(path, what):
    """The UTF-8 text of a user's file, or a ConfigError naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path!r} not found" + (" (a directory)" if os.path.isdir(path) else "") +
                          ": check the path")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}): convert it or pass another file") \
            from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read ({e.strerror}): check its permissions") from None


# ---------------------------------------------------------------------------------------------- --help
def usage(doc):
    """The usage part of an entry point's docstring: its first paragraph and the indented command lines after it
    (up to the first blank line that follows them)."""
    lines, out, seen_cmd = (doc or "").strip("\n").splitlines(), [], False
    for line in lines:
        if seen_cmd and not line.strip():
            break
        seen_cmd = seen_cmd or line.startswith("    ")
        out.append(line)
    return "\n".join(out).rstrip()


def field_notes(cls):
    """{field: (group, meaning)} read from the dataclass source: a comment line alone in the body starts a group
    (a block of two or more comment lines describes the field after it instead: its first sentence is the
    meaning), and the trailing comment of a field's line is its meaning. Fields before any group: group None."""
    src = textwrap.dedent(inspect.getsource(cls))
    alone, trailing = {}, {}  # line number -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.line[: tok.start[1]].strip() else alone)[tok.start[0]] = text
    notes, group = {}, None
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1  # the comment lines right above the field
        while n in alone:
            above.insert(0, alone[n])
            n -= 1
        meaning = next((trailing[n] for n in range(node.lineno, node.end_lineno + 1) if n in trailing), "")
        if len(above) == 1:
            group = above[0]
        elif above and not meaning:
            meaning = " ".join(above).split(". ")[0].rstrip(".")
        notes[node.target.id] = (group, meaning)
    return notes


def _type_name(annotation):
    typ, optional = _base_type(annotation)
    name = "true|false" if typ is bool else typ.__name__.upper()
    return name + ("|None" if optional else "")


def _valid(meta):
    """The valid values a field's spec declares, in words."""
    if "interval" in meta:
        return meta["interval"][4]
    if "choices" in meta:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if meta.get("each"):
        return "comma-separated, each one of " + ", ".join(meta["each"])
    name = getattr(meta.get("check"), "__name__", "_")
    return "" if name.startswith(("_", "<")) else f"checked by {name}"


def help_text(doc, classes):
    """The `--help` of an entry point: the usage part of its docstring `doc`, then every field of the dataclasses
    `classes` as `--name=TYPE  meaning (default X; valid values)`, grouped as the dataclass groups them."""
    out = [usage(doc), "", "Options: --key=value, each at most once; a preset file (config/NAME.py) sets several, "
           "and flags override it."]
    for cls in classes:
        hints, notes = typing.get_type_hints(cls), field_notes(cls)
        rows, group = [], None
        for f in dataclasses.fields(cls):
            g, meaning = notes.get(f.name, (None, ""))
            if g != group:
                rows.append((None, f"  {g}"))
                group = g
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = str(default).lower() if isinstance(default, bool) else repr(default)
            details = "; ".join(x for x in (f"default {shown}", _valid(f.metadata)) if x)
            rows.append((f"--{f.name}={_type_name(hints[f.name])}", f"{meaning} ({details})" if meaning else
                         f"({details})"))
        width = min(36, max(len(a) for a, _ in rows if a))
        out += ["", f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
        out += [text if name is None else f"    {name:<{width}}  {text}" for name, text in rows]
    return "\n".join(out)
