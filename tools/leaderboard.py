"""Turn run logs into audited records under records/, prove their accuracy by recomputation, render leaderboard.md.

    python tools/leaderboard.py add logs/a.json logs/b.json logs/c.json --name ShortName --description "what changed" \
        [--models logs --data-dir DIR]     # with --models: verified, the accuracy recomputed from the saved models
    python tools/leaderboard.py verify records/DATE_Name --models DIR --data-dir DIR   # verify a record (again)
    python tools/leaderboard.py reproduce records/DATE_Name --runs 3     # re-run its logged source here, compare
    python tools/leaderboard.py render     # rewrite leaderboard.md (and stale generated files) from records/
    python tools/leaderboard.py check      # CI: every rule of add and verify, and the generated files agree

A record is a folder records/YYYY-MM-DD_ShortName/ holding byte-identical copies of its run logs, a generated
statistics.md and record.json, and a README.md written by the submitter. The logs are the evidence of the times:
every number in statistics.md, record.json and leaderboard.md is re-derived from them, and `check` fails if any file
disagrees. The accuracy a log states is what the entry's own process computed; the leaderboard shows only accuracy
recomputed by `verify` (tools/verify.py) from each run's saved model, whose sha256 the log and record.json keep.

The rules are listed in records/README.md and implemented here: `validate_log(log)` checks one log (a path or a
parsed dict) and returns its `Run`; every rule of one log is an entry of `RULES`, so each can be tested alone, and a
refusal lists every rule broken. `validate_runs` checks the runs of one record, `verification_problems` a stored
verification (recomputed accuracy, batch independence, the FLOP floor), `date_problems` a record's date and
`record_problems` the records against each other. The race's own rules come from the harness
(`airbench_ssl.is_check_epoch`, `reached_target`, `OFFICIAL_MD5`), and a record's evaluation code must be the
harness's own, definition for definition (`pinning_problems`, a static first filter; verification is the proof).

Writes are atomic (temp file or temp folder in the same directory, then rename), and `add`, `verify` and `render`
hold an exclusive flock on the records folder, so concurrent commands serialize, and a crash leaves either the
previous state or leftovers that git ignores and the next `add` or `render` removes.
"""

import argparse
import ast
import builtins
import contextlib
import dataclasses
import datetime
import fcntl
import functools
import gc
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import stat
import sys
import tempfile
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import stats
import verify

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import airbench_ssl as ab  # noqa: E402  (the repo root is not on sys.path when run as tools/leaderboard.py)

LOG_FORMAT = "airbench-ssl-log/2"
TARGET_PCT = 90.0
KNN_K = 10
TRAIN_IMAGES, TEST_IMAGES = 50_000, 10_000
MIN_RUNS = 3
# Fields that name per-machine paths, the seed or how the model is saved: they differ between honest runs of one
# recipe without changing its training.
PER_RUN_CONFIG_KEYS = frozenset({"seed", "data_dir", "log_dir", "download", "save_model"})
MODEL_FORMATS = ("weights", "export")
# Near-duplicate runs: losses that agree to the 4 decimals the harness prints (rounding moves one by <= 5e-5) are one
# run under any run_id or seed. Two seeds' epoch losses differ by ~1e-3 or more (augmentation noise in the mean of an
# epoch's steps), so honest runs never agree over every epoch.
LOSS_TOLERANCE = 1e-4
GENERATED_FILES = ("record.json", "statistics.md")
SUBMITTER_FILE = "README.md"
STAGING_PREFIX = ".staging-"

# Bounds on what a log may contain, so that no input can hang or exhaust the validator. A real log is ~100 KB
# (the harness source is ~45 KB of it) plus ~100 bytes per epoch.
MAX_LOG_BYTES = 64 * 2**20
MAX_RECORD_JSON_BYTES = 2**20
MAX_SOURCE_CHARS = 2**20
MAX_JSON_DEPTH = 32
MAX_ABS_NUMBER = 10**15
MAX_DESCRIPTION_CHARS = 200
# No epoch of CIFAR-10 takes a millisecond; a time below that is not a measurement (0.0 and denormals included).
MIN_EPOCH_SECONDS = 1e-3

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
DATE_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# The harness's flag of a Config field is "--" + the name with "_" as "-"; entries may add fields of any name.
FLAG_PATTERN = re.compile(r"--[A-Za-z][A-Za-z0-9-]*")
CREATED_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# Printable ASCII only (no look-alike Unicode, no control characters, no '|' to break a table), as real names are.
GPU_NAME_PATTERN = re.compile(r" *[A-Za-z0-9][A-Za-z0-9 ._()/+,:@-]{0,79}")
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,39}")
DESCRIPTION_PATTERN = re.compile(r"[\x20-\x7b\x7d\x7e]{1,%d}" % MAX_DESCRIPTION_CHARS)  # printable ASCII but '|'
SMI_DRIVER = re.compile(r"Driver Version:[ \t]*(\S+)")  # linear: the two classes cannot overlap
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}

# The evaluation every record is judged by: these definitions in a record's logged source must be those of the
# canonical harness, together with every module-level name they use (helpers, imports, and builtins, which must
# not be shadowed).
PINNED = ("OFFICIAL_MD5", "_CifarUnpickler", "parse_cifar_batch", "find_cifar", "load_cifar10",
          "extract_features", "knn_predict", "knn_accuracy", "knn_check", "is_check_epoch", "reached_target")
DYNAMIC_NAMES = frozenset({"exec", "eval", "globals", "__import__", "__builtins__"})
PATCH_ATTRIBUTES = frozenset({"__code__", "__globals__", "__builtins__", "__dict__", "__defaults__",
                              "__kwdefaults__", "__closure__"})
BANNED_MODULES = frozenset({"builtins", "importlib", "ctypes"})
MUTATING_METHODS = frozenset({"update", "pop", "popitem", "clear", "setdefault", "append", "extend", "insert",
                              "remove", "sort", "reverse", "add", "discard", "__setitem__", "__delitem__"})
# What an entry may set at runtime: library speed switches and environment variables, not library functions.
PATCHABLE_MODULES = ("torch.backends.", "torch._inductor.config.", "torch._dynamo.config.", "os.environ.")

# Published results of the reference implementation; they were timed with its own data pipeline, so they are a
# yardstick, never a record to beat.
REFERENCE_SOURCE = "[dkobak/simclr-cifar10](https://github.com/dkobak/simclr-cifar10)"
REFERENCE_ROWS = (
    ("SimCLR ResNet18, batch 1024, grayscale p=0.2, fp32", "700", "90.0 %", "2 h 58 min"),
    ("SimCLR ResNet18, batch 512, grayscale p=0.1, fp32", "500", "90.3 %", "1 h 39 min (11.9 s/epoch)"),
)
REFERENCE_HARDWARE = "A100, 16 CPU data-loader workers"


def one_line(text: str) -> str:
    """Any text as one printable line: control characters (and any other unprintable ones) escaped."""
    return text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Refused(Exception):
    """A log, a set of logs or a record breaks a rule; `file` names the offending file when there is one, and `also`
    holds the further problems of the same input (a refusal lists them all)."""

    def __init__(self, reason: str, file: str | None = None, also: Sequence["Refused"] = ()) -> None:
        super().__init__(reason)
        self.file, self.also = file, tuple(also)

    @classmethod
    def of(cls, problems: Sequence["Refused"]) -> "Refused":
        return cls(str(problems[0]), problems[0].file, [*problems[0].also, *problems[1:]])

    def line(self) -> str:
        return one_line(str(self) if self.file is None else f"{self.file}: {self}")

    def each(self) -> list["Refused"]:
        return [Refused(str(self), self.file), *self.also]

    def lines(self) -> list[str]:
        return [problem.line() for problem in self.each()]


class Broken(Exception):
    """Raised by a rule: the message says what is wrong; validate_log adds the rule's name and the file."""


@dataclasses.dataclass(frozen=True)
class Run:
    file: str  # log file name
    run_id: str
    created_utc: str
    seed: int
    epochs_run: int
    time_to_target_seconds: float
    knn_at_stop_pct: float
    gpu_model: str  # normalised name of one GPU
    world_size: int
    code_sha256: str
    config: dict[str, Any]
    torch_version: str
    cuda_version: str
    model: dict[str, Any]  # the saved model: file, format, sha256, bytes
    epoch_seconds: tuple[float, ...]  # of the trained epochs 1, 2, ...
    losses: tuple[float, ...]
    identity: frozenset[str]  # exact evidence: a run is the same run as another if these share an element

    @property
    def hardware(self) -> str:
        return self.gpu_model if self.world_size == 1 else f"{self.world_size}× {self.gpu_model}"


@dataclasses.dataclass(frozen=True)
class Record:
    folder: Path
    name: str
    date: str
    description: str
    runs: tuple[Run, ...]
    verification: dict[str, Any] | None = None  # what `verify` recomputed (see verification_block), or None

    @property
    def hardware(self) -> str:
        return self.runs[0].hardware

    @property
    def times(self) -> list[float]:
        return [r.time_to_target_seconds for r in self.runs]

    @property
    def reported_accs(self) -> list[float]:
        return [r.knn_at_stop_pct for r in self.runs]

    @property
    def recomputed_accs(self) -> list[float] | None:
        if self.verification is None:
            return None
        return [v["recomputed_knn_pct"] for v in self.verification["runs"]]

    @property
    def mean_time(self) -> float:
        return stats.summarize(self.times)[0]


########################################
#  Reading untrusted JSON

def _bounded_int(text: str) -> int:
    # Checked on the text: int() of a 5,000-digit string raises (or, without the limit, takes quadratic time).
    if len(text.lstrip("-")) > 16 or abs(int(text)) > MAX_ABS_NUMBER:
        raise Broken(f"integer {text[:20]}{'...' if len(text) > 20 else ''} ({len(text)} digits) is out of range "
                     f"(|x| <= {MAX_ABS_NUMBER:.0e})")
    return int(text)


def _bounded_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or abs(value) > MAX_ABS_NUMBER:
        raise Broken(f"number {text[:20]} is out of range (finite, |x| <= {MAX_ABS_NUMBER:.0e})")
    return value


def _refuse_constant(text: str) -> Any:
    raise Broken(f"{text} is not a number a log may hold")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A repeated key means two readers may see two different logs: refuse rather than pick one.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dupe = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Broken(f"key {dupe!r} appears twice in one object")
    return obj


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Broken(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_int=_bounded_int, parse_float=_bounded_float, parse_constant=_refuse_constant,
                          object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise Broken(f"not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise Broken(f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None


def check_json_values(obj: Any) -> None:
    """JSON types only, finite bounded numbers, bounded depth; iterative, so depth cannot exhaust the stack."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise Broken(f"JSON nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(value, dict):
            if not all(isinstance(k, str) for k in value):
                raise Broken("an object has a key that is not a string")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
        elif isinstance(value, bool) or value is None or isinstance(value, str):
            continue
        elif isinstance(value, (int, float)):
            if not (math.isfinite(value) and abs(value) <= MAX_ABS_NUMBER):
                raise Broken(f"number {value!r} is out of range (finite, |x| <= {MAX_ABS_NUMBER:.0e})")
        else:
            raise Broken(f"value of type {type(value).__name__} is not JSON")


def read_bounded(path: Path, limit: int, follow_symlinks: bool) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; the size is checked before anything is read."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError as e:
        raise Broken(f"cannot read: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise Broken("is a symbolic link: records hold plain files")
    if not stat.S_ISREG(st.st_mode):
        raise Broken("is not a regular file")
    if st.st_size > limit:
        raise Broken(f"is {st.st_size} bytes, over the {limit}-byte limit")
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise Broken(f"cannot read: {e.strerror}") from None
    if len(raw) > limit:
        raise Broken(f"is over the {limit}-byte limit")
    return raw


########################################
#  The pinned evaluation
#
# A first filter, not the guarantee (that is `verify`, which recomputes the accuracy from the saved model): it catches
# honest mistakes and obvious patches in a record's logged source, precisely enough never to refuse honest code.
# Names are resolved by scope as Python resolves them, so a local variable named like a module is not the module, and
# every walk over the tree uses an explicit stack: any source Python can parse is analysed without RecursionError.

_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")
_DOCSTRING_OWNERS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _body_without_docstring(node: ast.AST) -> list[ast.stmt]:
    body = node.body  # type: ignore[attr-defined]
    if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)):
        return body[1:] or [ast.Pass()]
    return body


def fingerprint(node: ast.AST) -> str:
    """What a piece of code is, for comparison: the sha256 of its syntax tree without positions and docstrings, in
    preorder with list lengths (so the sequence has one reading), built with an explicit stack (ast.dump and
    copy.deepcopy recurse, and fail on a long `1+1+...+1` that Python parses)."""
    out: list[str] = []
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, ast.AST):
            out.append(type(item).__name__)
            values = [_body_without_docstring(item) if name == "body" and isinstance(item, _DOCSTRING_OWNERS)
                      else value for name, value in ast.iter_fields(item)]
            stack.extend(reversed(values))
        elif isinstance(item, list):
            out.append(f"[{len(item)}")
            stack.extend(reversed(item))
        else:  # a constant or an identifier; repr escapes the separator
            out.append(f"{type(item).__name__}:{item!r}")
    return hashlib.sha256("\\0".join(out).encode("utf-8", "surrogatepass")).hexdigest()


def _stored_names(node: ast.AST) -> Iterator[str]:
    """Names a statement binds in its own scope, not counting its nested blocks (visited as statements)."""
    todo = [child for field, child in ast.iter_fields(node) if field not in _BODY_FIELDS]
    while todo:
        item = todo.pop()
        if isinstance(item, _COMPREHENSIONS):
            # a comprehension's variables are its own; only `:=` inside it binds in the enclosing scope
            yield from (n.target.id for n in ast.walk(item) if isinstance(n, ast.NamedExpr))
            continue
        if isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, ast.Name) and isinstance(item.ctx, (ast.Store, ast.Del)):
            yield item.id
        elif isinstance(item, (ast.MatchAs, ast.MatchStar)) and item.name:
            yield item.name
        elif isinstance(item, ast.MatchMapping) and item.rest:
            yield item.rest
        if isinstance(item, ast.AST) and not isinstance(item, ast.Lambda):
            todo.extend(child for _, child in ast.iter_fields(item))


@dataclasses.dataclass(frozen=True)
class ModuleFacts:
    nodes: dict[str, tuple[ast.AST | str, ...]]  # module-level name -> what binds it: statements, or import texts
    star_import: bool

    def binding(self, name: str) -> frozenset[str]:
        """How `name` is bound: fingerprints of the statements, and the imports (computed only for names compared)."""
        return frozenset(how if isinstance(how, str) else fingerprint(how) for how in self.nodes.get(name, ()))


def module_facts(tree: ast.Module) -> ModuleFacts:
    """What binds each module-level name: definitions, imports and statements (nested blocks included, function and
    class bodies not: their names are their own)."""
    nodes: dict[str, list[ast.AST | str]] = {}
    star = False

    def bind(name: str, how: ast.AST | str) -> None:
        nodes.setdefault(name, []).append(how)

    todo: list[ast.AST] = list(reversed(tree.body))
    while todo:
        s = todo.pop()
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(s.name, s)
        elif isinstance(s, ast.Import):
            for alias in s.names:
                # `import torch.nn` binds `torch` just as `import torch` does.
                module = alias.name if alias.asname else alias.name.split(".")[0]
                bind(alias.asname or module, f"import {module}")
        elif isinstance(s, ast.ImportFrom):
            source = "." * s.level + (s.module or "")
            for alias in s.names:
                star = star or alias.name == "*"
                if alias.name != "*":
                    bind(alias.asname or alias.name, f"from {source} import {alias.name}")
        elif isinstance(s, ast.ExceptHandler):
            if s.name:
                bind(s.name, s)
            todo.extend(reversed(s.body))
        elif isinstance(s, ast.match_case):
            for name in _stored_names(s):
                bind(name, s.pattern)
            todo.extend(reversed(s.body))
        else:
            for name in _stored_names(s):
                bind(name, s)
            for field in reversed(_BODY_FIELDS):
                todo.extend(reversed(getattr(s, field, None) or []))
    return ModuleFacts({k: tuple(v) for k, v in nodes.items()}, star)


@dataclasses.dataclass(eq=False)
class Scope:
    """One Python scope of a source: the names it binds, and those of them that name a module (or an attribute of one,
    e.g. `F` -> torch.nn.functional), whether by an import or by assignment from another such name."""
    kind: str  # "module", "function", "class" or "comprehension"
    parent: "Scope | None"
    bound: set[str] = dataclasses.field(default_factory=set)
    declared_global: set[str] = dataclasses.field(default_factory=set)
    declared_nonlocal: set[str] = dataclasses.field(default_factory=set)
    modules: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def module(self) -> "Scope":
        scope = self
        while scope.parent is not None:
            scope = scope.parent
        return scope

    def owner(self, name: str) -> "Scope | None":
        """The scope whose binding of `name` a reference here means, as Python resolves it; None: a builtin."""
        scope: Scope | None = self
        while scope is not None and scope.parent is not None:
            if name in scope.declared_global:
                break
            if (name in scope.bound and name not in scope.declared_nonlocal
                    and (scope is self or scope.kind != "class")):  # class bodies are not enclosing scopes
                return scope
            scope = scope.parent
        module = self.module
        return module if name in module.bound else None

    def binding_scope(self, name: str) -> "Scope":
        """Where an assignment to `name` here binds it."""
        if name in self.declared_global:
            return self.module
        if name in self.declared_nonlocal and self.parent is not None:
            return self.parent.owner(name) or self.module
        return self


def _parameters(args: ast.arguments) -> list[tuple[ast.arg, ast.expr | None]]:
    """(parameter, its default or None) of a signature."""
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*zip(positional, defaults), *zip(args.kwonlyargs, args.kw_defaults), *((a, None) for a in extra)]


def reference(node: ast.AST, scope: Scope) -> tuple[str | None, list[str]]:
    """`F.normalize.x` -> ("F", ["normalize", "x"]), through subscripts ("[]"), `getattr(obj, "name")` and `vars(obj)`
    (its "__dict__"); the result of any other call is a new object, not a name's: (None, path)."""
    path: list[str] = []
    while True:
        if isinstance(node, ast.Attribute):
            path.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript):
            path.append("[]")
            node = node.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords
              and scope.owner(node.func.id) is None and (node.func.id, len(node.args)) in
              {("getattr", 2), ("getattr", 3), ("vars", 1)}):
            name = "__dict__" if node.func.id == "vars" else getattr(node.args[1], "value", None)
            path.append(name if isinstance(name, str) else "?")
            node = node.args[0]
        elif isinstance(node, ast.Name):
            return node.id, path[::-1]
        else:
            return None, path[::-1]


def module_path(node: ast.AST, scope: Scope) -> str | None:
    """The dotted module path `node` names in `scope` (`F.normalize` -> torch.nn.functional.normalize), or None."""
    root, path = reference(node, scope)
    owner = scope.owner(root) if root is not None else None
    if owner is None or root not in owner.modules:
        return None
    return ".".join([owner.modules[root], *path])


def analyse_scopes(tree: ast.Module) -> list[tuple[ast.AST, Scope]]:
    """Every node of the tree with the scope it is evaluated in; each Scope knows its bindings and module aliases."""
    module = Scope("module", None)
    scopes, placed = [module], []
    imported: list[tuple[Scope, str, str]] = []  # (scope, name, dotted module path)
    assigned: list[tuple[Scope, ast.expr, Scope, str]] = []  # (scope of the value, value, scope of the name, name)
    stack: list[tuple[ast.AST, Scope]] = [(tree, module)]

    def push(nodes: Sequence[ast.AST | None], scope: Scope) -> None:
        stack.extend((n, scope) for n in nodes if n is not None)

    def new_scope(kind: str, parent: Scope) -> Scope:
        scopes.append(Scope(kind, parent))
        return scopes[-1]

    while stack:
        node, scope = stack.pop()
        placed.append((node, scope))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = new_scope("function", scope)
            if not isinstance(node, ast.Lambda):
                scope.bound.add(node.name)
                push([*node.decorator_list, node.returns], scope)
            for param, default in _parameters(node.args):
                inner.bound.add(param.arg)
                push([param.annotation, default], scope)
                if default is not None:
                    assigned.append((scope, default, inner, param.arg))
            push(node.body if isinstance(node.body, list) else [node.body], inner)
            continue
        if isinstance(node, ast.ClassDef):
            scope.bound.add(node.name)
            push([*node.decorator_list, *node.bases, *node.keywords], scope)
            push(node.body, new_scope("class", scope))
            continue
        if isinstance(node, _COMPREHENSIONS):
            inner = new_scope("comprehension", scope)
            push([node.generators[0].iter], scope)  # the first iterable is evaluated outside
            for i, generator in enumerate(node.generators):
                push([generator.target, *generator.ifs, *([generator.iter] if i else [])], inner)
            push([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt], inner)
            continue
        if isinstance(node, ast.NamedExpr):  # binds in the nearest enclosing scope that is not a comprehension
            target = scope
            while target.kind == "comprehension" and target.parent is not None:
                target = target.parent
            target.bound.add(node.target.id)
            assigned.append((scope, node.value, target, node.target.id))
            push([node.value], scope)
            continue
        if isinstance(node, ast.Global):
            scope.declared_global.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            scope.declared_nonlocal.update(node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                scope.bound.add(alias.asname or top)
                imported.append((scope, alias.asname or top, alias.name if alias.asname else top))
        elif isinstance(node, ast.ImportFrom):
            source = "." * node.level + (node.module or "")
            for alias in node.names:
                if alias.name != "*":
                    scope.bound.add(alias.asname or alias.name)
                    imported.append((scope, alias.asname or alias.name, f"{source}.{alias.name}"))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            scope.bound.add(node.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            scope.bound.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            scope.bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            scope.bound.add(node.rest)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    assigned.append((scope, node.value, scope, target.id))
                elif (isinstance(target, (ast.Tuple, ast.List)) and isinstance(node.value, (ast.Tuple, ast.List))
                      and len(target.elts) == len(node.value.elts)):
                    assigned.extend((scope, v, scope, t.id) for t, v in zip(target.elts, node.value.elts)
                                    if isinstance(t, ast.Name))
        elif (isinstance(node, (ast.For, ast.AsyncFor)) and isinstance(node.target, ast.Name)
              and isinstance(node.iter, (ast.Tuple, ast.List, ast.Set))):  # `for m in (F, np):` m is each of them
            assigned.extend((scope, v, scope, node.target.id) for v in node.iter.elts)
        push(list(ast.iter_child_nodes(node)), scope)

    # Names declared global and bound in a function are module-level names too.
    for scope in scopes:
        module.bound |= scope.declared_global & scope.bound
    # Module aliases spread along assignments (`g = F`, then `h = g`): a worklist, each name set once.
    waiting: dict[tuple[int, str], list[tuple[list[str], Scope, str]]] = {}
    for value_scope, value, name_scope, name in assigned:
        root, path = reference(value, value_scope)
        owner = value_scope.owner(root) if root is not None else None
        if owner is not None:
            waiting.setdefault((id(owner), root), []).append((path, name_scope.binding_scope(name), name))
    ready: list[tuple[Scope, str]] = []
    for scope, name, dotted in imported:
        target = scope.binding_scope(name)
        if name not in target.modules:
            target.modules[name] = dotted
            ready.append((target, name))
    while ready:
        scope, name = ready.pop()
        for path, target, target_name in waiting.pop((id(scope), name), []):
            if target_name not in target.modules:
                target.modules[target_name] = ".".join([scope.modules[name], *path])
                ready.append((target, target_name))
    return placed


def parse_source(source: str) -> ast.Module:
    if len(source) > MAX_SOURCE_CHARS:
        raise Broken(f"code.source has {len(source)} characters, over the {MAX_SOURCE_CHARS} limit")
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise Broken(f"code.source cannot be parsed as Python ({type(e).__name__})") from None


@functools.lru_cache(maxsize=4)
def canonical_facts(canonical_source: str) -> tuple[dict[str, frozenset[str]], frozenset[str]]:
    """The protected names, PINNED and, transitively, every module-level name or builtin their definitions use,
    with how the canonical module binds each."""
    facts = module_facts(ast.parse(canonical_source))
    missing = [name for name in PINNED if name not in facts.nodes]
    if missing:
        raise Refused(f"the canonical harness {ab.__file__} lacks the pinned definitions {', '.join(missing)}")
    visible = set(facts.nodes) | set(dir(builtins)) | {"__file__", "__name__"}
    protected: set[str] = set()
    todo = list(PINNED)
    while todo:
        name = todo.pop()
        if name in protected:
            continue
        protected.add(name)
        for node in facts.nodes.get(name, ()):
            if not isinstance(node, str):
                todo.extend(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in visible)
    return {name: facts.binding(name) for name in protected}, frozenset(protected)


def _patchable(dotted: str) -> bool:
    return any(dotted.startswith(p) or dotted == p[:-1] for p in PATCHABLE_MODULES)


def _store_problem(target: ast.AST, scope: Scope, protected: frozenset[str]) -> str | None:
    """What a store into (or a mutating call on) `target` changes, if it is a module or a pinned object."""
    root, path = reference(target, scope)
    owner = scope.owner(root) if root is not None else None
    if owner is None:
        return None  # a call's result, or a builtin
    if root in owner.modules:
        dotted = ".".join([owner.modules[root], *path])
        return None if _patchable(dotted) else f"patches {dotted} at runtime"
    if owner.parent is None and root in protected:
        return f"modifies the pinned {root} at runtime"
    return None


def _patch_problems(node: ast.AST, scope: Scope, protected: frozenset[str]) -> Iterator[str]:
    if isinstance(node, (ast.Global, ast.Nonlocal)) and protected & set(node.names):
        yield f"rebinds {', '.join(sorted(protected & set(node.names)))} through `global`"
    elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
        if node.id in DYNAMIC_NAMES and scope.owner(node.id) is None:
            yield f"uses {node.id}, which can rewrite any definition"
    elif isinstance(node, ast.Attribute):
        # an object's own __dict__ (`self.__dict__`) is its business; a module's or a pinned object's is not
        if node.attr in PATCH_ATTRIBUTES and (node.attr != "__dict__" or module_path(node.value, scope) is not None
                                              or _store_problem(node.value, scope, protected)):
            yield f"touches {node.attr}, which can rewrite any definition"
        if isinstance(node.ctx, (ast.Store, ast.Del)):
            yield from filter(None, [_store_problem(node, scope, protected)])
        if node.attr == "modules" and module_path(node, scope) == "sys.modules":
            yield "uses sys.modules, which can replace any module"
    elif isinstance(node, ast.Subscript) and isinstance(node.ctx, (ast.Store, ast.Del)):
        yield from filter(None, [_store_problem(node, scope, protected)])
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        banned = sorted({n.split(".")[0] for n in names} & BANNED_MODULES)
        if banned:
            yield f"imports {', '.join(banned)}, which can rewrite any definition"
        if isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "modules" for a in node.names):
            yield "uses sys.modules, which can replace any module"
    elif isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and scope.owner(func.id) is None:
            if func.id in ("setattr", "delattr") and node.args:
                name = node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else "?"
                target = ast.Attribute(value=node.args[0], attr=name if isinstance(name, str) else "?")
                yield from filter(None, [_store_problem(target, scope, protected)])
            elif func.id in ("locals", "vars") and not node.args and scope.kind in ("module", "class"):
                yield f"uses {func.id}() where it is the module's namespace, which can rewrite any definition"
        elif isinstance(func, ast.Attribute) and func.attr in MUTATING_METHODS:
            receiver = func.value
            # a module's own function named like a method (`np.sort(x)`, `heapq.heappop`) mutates nothing here
            if not (isinstance(receiver, ast.Name) and module_path(receiver, scope) is not None):
                yield from filter(None, [_store_problem(receiver, scope, protected)])


@functools.lru_cache(maxsize=32)
def pinning_problems(canonical_source: str, source: str) -> tuple[str, ...]:
    """Why `source` does not evaluate exactly as the canonical harness does; empty when it does.

    Static, so it catches what can be seen in the source: a pinned definition edited or missing, a name it uses
    (helper, import, builtin) bound differently, rebinding through `global`, and the usual runtime patching (stores
    into modules, through any alias, or into pinned objects; exec/eval/globals; function internals). Comments and
    docstrings may differ."""
    canonical, protected = canonical_facts(canonical_source)
    with _no_cyclic_gc():
        tree = parse_source(source)
        try:
            entry = module_facts(tree)
            placed = analyse_scopes(tree)
        except (RecursionError, MemoryError):  # not expected of the iterative walks; refused, never a traceback
            raise Broken("code.source is too deeply nested to analyse") from None
        return _problems(canonical, protected, entry, placed)


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """A harness source is ~10^5 AST objects, none in a cycle: the collector's full passes over the whole heap
    (torch's included) that they trigger cost more than the analysis (measured: 0.3-0.5 s spikes on a 0.05 s call)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _problems(canonical: dict[str, frozenset[str]], protected: frozenset[str], entry: ModuleFacts,
              placed: list[tuple[ast.AST, Scope]]) -> tuple[str, ...]:
    problems = []
    pinned_first = sorted(protected, key=lambda n: (n not in PINNED, PINNED.index(n) if n in PINNED else 0, n))
    differ = [n for n in pinned_first if entry.binding(n) != canonical[n]]
    if differ:
        problems.append(f"differs from the canonical harness in {', '.join(differ)}")
    if entry.star_import:
        problems.append("uses `from ... import *`, which can rebind pinned names")
    for node, scope in placed:
        problems.extend(_patch_problems(node, scope, protected))
    return tuple(dict.fromkeys(problems))  # each problem once, in order


def canonical_source() -> str:
    """The harness next to the tools defines the evaluation: changing a pinned definition there is a rules change."""
    with open(ab.__file__, encoding="utf-8") as f:
        return f.read()


########################################
#  Rules of one log

NUMBER = (int, float)
NONE = type(None)
# (path, allowed types): everything a rule reads, checked before any rule runs.
SCHEMA: tuple[tuple[str, Any], ...] = (
    ("run_id", str), ("created_utc", str), ("argv", list),
    ("launch", dict), ("launch.world_size", int), ("launch.command", list), ("launch.torchrun", bool),
    ("config_sources", dict), ("config_sources.preset", str), ("config_sources.config_file", (str, NONE)),
    ("config_sources.file_overrides", dict),
    ("config", dict), ("config.epochs", int), ("config.check_first_epoch", int), ("config.check_every_epochs", int),
    ("config.target_pct", NUMBER), ("config.knn_k", int), ("config.train_subset", int), ("config.seed", int),
    ("config.device", str),
    ("code", dict), ("code.source", str), ("code.sha256", str),
    ("environment", dict), ("environment.torch", str), ("environment.cuda", (str, NONE)),
    ("environment.driver", (str, NONE)), ("environment.device", str), ("environment.gpu_name", (str, NONE)),
    ("environment.gpu_names", list), ("environment.gpu_count", int), ("environment.world_size", int),
    ("environment.nvidia_smi", (str, NONE)),
    ("data", dict), ("data.official", bool), ("data.files", dict), ("data.train_images", int),
    ("data.test_images", int),
    ("eligible", bool), ("ineligible_reasons", list),
    ("timing", dict), ("timing.timed", str), ("timing.not_timed", str),
    ("epochs", list),
    ("untimed_seconds", dict), ("untimed_seconds.data_load", NUMBER), ("untimed_seconds.warmup", NUMBER),
    ("untimed_seconds.knn_checks", NUMBER), ("untimed_seconds.final_eval", NUMBER),
    ("result", dict), ("result.status", str), ("result.reached_target", bool), ("result.target_pct", NUMBER),
    ("result.epochs_run", int), ("result.timed_seconds", NUMBER), ("result.time_to_target_seconds", (*NUMBER, NONE)),
    ("result.knn_at_stop_pct", (*NUMBER, NONE)),
    ("final_eval", (dict, NONE)),
    ("total_wall_seconds", NUMBER),
)
ROW_SCHEMA = (("epoch", int), ("loss", (*NUMBER, NONE)), ("lr", (*NUMBER, NONE)), ("epoch_seconds", NUMBER),
              ("timed_seconds", NUMBER), ("knn_pct", (*NUMBER, NONE)), ("knn_seconds", (*NUMBER, NONE)))


def _get(obj: Any, path: str, kinds: Any) -> Any:
    value = obj
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise Broken(f"missing field {path}")
        value = value[key]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    # bool is an int to Python but never a valid epoch, seed or time.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is NONE else k.__name__ for k in kinds)
        raise Broken(f"field {path} should be {names}, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_schema(log: Any) -> None:
    """The log's shape: format, kind, field types, names used in file names and text. Not a rule one may drop."""
    check_json_values(log)
    if not isinstance(log, dict):
        raise Broken("not a JSON object")
    if log.get("format") != LOG_FORMAT:
        raise Broken(f"format is {_short(log.get('format'))}, expected {LOG_FORMAT!r}")
    if log.get("kind") != "train":
        raise Broken(f"kind is {_short(log.get('kind'))}: only training logs can be records")
    for path, kinds in SCHEMA:
        _get(log, path, kinds)
    for i, row in enumerate(log["epochs"]):
        if not isinstance(row, dict):
            raise Broken(f"epochs[{i}] is not a JSON object")
        for key, kinds in ROW_SCHEMA:
            try:
                _get(row, key, kinds)
            except Broken as e:
                raise Broken(f"epochs[{i}]: {e}") from None
    for path in ("argv", "launch.command", "ineligible_reasons"):
        if not all(isinstance(x, str) for x in _get(log, path, list)):
            raise Broken(f"{path} should hold strings only")
    if not RUN_ID_PATTERN.fullmatch(log["run_id"]):
        raise Broken(f"run_id {_short(log['run_id'])} is not a plain name (letters, digits, '.', '_', '-')")
    if not CREATED_PATTERN.fullmatch(log["created_utc"]) or _utc(log["created_utc"]) is None:
        raise Broken(f"created_utc {_short(log['created_utc'])} is not a real YYYY-MM-DDTHH:MM:SSZ time")
    if not VERSION_PATTERN.fullmatch(log["environment"]["torch"]):
        raise Broken(f"environment.torch {_short(log['environment']['torch'])} is not a version string")


def _utc(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return None


def close(a: float, b: float) -> bool:
    """Timing equality for numbers that went through float sums and JSON: 1e-6 relative plus 1 ms absolute."""
    return abs(a - b) <= 1e-3 + 1e-6 * max(abs(a), abs(b))


def _canonical_value(value: Any) -> Any:
    # Numbers compare by value (a JSON 1 is the harness's 1.0), but a bool is never a number.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return type(value).__name__, value
    if isinstance(value, (int, float)):
        return "number", float(value)
    if isinstance(value, list):
        return "list", tuple(_canonical_value(v) for v in value)
    return "dict", tuple(sorted((k, _canonical_value(v)) for k, v in value.items()))


def _same_value(a: Any, b: Any) -> bool:
    return _canonical_value(a) == _canonical_value(b)


def schedule_of(config: dict[str, Any]) -> types.SimpleNamespace:
    return types.SimpleNamespace(epochs=config["epochs"], check_first_epoch=config["check_first_epoch"],
                                 check_every_epochs=config["check_every_epochs"], target_pct=config["target_pct"])


def rule_source_hash(log: dict[str, Any]) -> None:
    if hashlib.sha256(log["code"]["source"].encode("utf-8")).hexdigest() != log["code"]["sha256"]:
        raise Broken("code.sha256 is not the sha256 of code.source: the logged source was edited")


def rule_pinned_evaluation(log: dict[str, Any]) -> None:
    problems = pinning_problems(canonical_source(), log["code"]["source"])
    if problems:
        raise Broken("; ".join(problems) + " (records are judged by the harness's own data loading, kNN, check "
                     "schedule and stop rule)")


def rule_official_data(log: dict[str, Any]) -> None:
    data, files = log["data"], log["data"]["files"]
    if set(files) != set(ab.OFFICIAL_MD5):
        raise Broken(f"data.files lists {_short(sorted(files))}, not exactly the six official CIFAR-10 files")
    bad = [name for name, md5 in ab.OFFICIAL_MD5.items()
           if not (isinstance(files[name], dict) and files[name].get("md5") == md5
                   and files[name].get("expected_md5") == md5 and files[name].get("ok") is True)]
    if bad:
        raise Broken(f"md5 of {', '.join(bad)} is not the official CIFAR-10 checksum")
    if data["official"] is not True:
        raise Broken("data.official is false")
    if (data["train_images"], data["test_images"]) != (TRAIN_IMAGES, TEST_IMAGES):
        raise Broken(f"data has {data['train_images']} train and {data['test_images']} test images, not "
                     f"{TRAIN_IMAGES} and {TEST_IMAGES}")


def rule_race_settings(log: dict[str, Any]) -> None:
    config = log["config"]
    if config["train_subset"] != 0:
        raise Broken(f"config.train_subset is {config['train_subset']}: records train on all {TRAIN_IMAGES} images")
    if config["target_pct"] != TARGET_PCT:
        raise Broken(f"config.target_pct is {config['target_pct']}, the race target is {TARGET_PCT}")
    if config["knn_k"] != KNN_K:
        raise Broken(f"config.knn_k is {config['knn_k']}, the race uses k={KNN_K}")


def rule_gpu_run(log: dict[str, Any]) -> None:
    env = log["environment"]
    if env["device"] != "cuda":
        raise Broken(f"environment.device is {_short(env['device'])}: records are GPU runs")
    if log["config"]["device"] not in ("auto", "cuda"):
        raise Broken(f"config.device is {_short(log['config']['device'])}, which cannot run on a GPU")
    if not (isinstance(env["cuda"], str) and VERSION_PATTERN.fullmatch(env["cuda"])):
        raise Broken(f"environment.cuda is {_short(env['cuda'])}, not the CUDA version of a GPU run")


def gpu_model(name: str) -> str:
    return " ".join(name.split())


def smi_gpu_names(smi: str) -> list[str]:
    """The GPU names of an nvidia-smi table: rows `|   0  NAME   On  | ...`. Parsed line by line without a regex, so
    any text (megabytes of spaces included) is read in linear time."""
    names = []
    for line in smi.splitlines():
        cell, bar, _rest = line[1:].partition("|")
        words = cell.split() if line.startswith("|") and bar else []
        if len(words) >= 3 and words[0].isascii() and words[0].isdigit() and words[-1] in ("On", "Off"):
            names.append(" ".join(words[1:-1]))
    return names


def _smi_lists(smi_name: str, name: str) -> bool:
    smi, real = gpu_model(smi_name).casefold(), gpu_model(name).casefold()
    # nvidia-smi shortens long names to fit its table, ending them with "..."
    return smi == real or (smi.endswith("...") and len(smi) > 3 and real.startswith(smi[:-3].rstrip()))


def rule_hardware(log: dict[str, Any]) -> None:
    env, launch = log["environment"], log["launch"]
    names = [env["gpu_name"], *env["gpu_names"]]
    for name in names:
        if not (isinstance(name, str) and GPU_NAME_PATTERN.fullmatch(name)):  # spaces are normalised away below
            raise Broken(f"GPU name {_short(name)} is not a plain printable-ASCII name")
    if not env["world_size"] == launch["world_size"] == len(env["gpu_names"]) >= 1:
        raise Broken(f"environment.world_size {env['world_size']}, launch.world_size {launch['world_size']} and "
                     f"{len(env['gpu_names'])} environment.gpu_names disagree")
    if env["world_size"] > 1 and launch["torchrun"] is not True:
        raise Broken(f"world_size {env['world_size']} without torchrun")
    if {gpu_model(n).casefold() for n in names} != {gpu_model(env["gpu_name"]).casefold()}:
        raise Broken(f"the ranks ran on different GPU models {_short(sorted(set(names)))}: hardware is one model")
    smi = env["nvidia_smi"]
    if not isinstance(smi, str):
        raise Broken("environment.nvidia_smi is missing: a GPU run logs the nvidia-smi table")
    listed = smi_gpu_names(smi)
    if not any(_smi_lists(row, env["gpu_name"]) for row in listed):
        raise Broken(f"GPU {env['gpu_name']!r} is not among the GPUs nvidia-smi lists ({_short(listed)})")
    if not 1 <= env["gpu_count"] <= len(listed):
        raise Broken(f"environment.gpu_count {env['gpu_count']} but nvidia-smi lists {len(listed)} GPUs")
    driver = SMI_DRIVER.search(smi)
    if env["driver"] is None or driver is None or driver.group(1) != env["driver"]:
        raise Broken(f"environment.driver {_short(env['driver'])} is not the driver nvidia-smi reports "
                     f"({driver.group(1) if driver else 'none'})")


def rule_self_declared_eligibility(log: dict[str, Any]) -> None:
    if log["eligible"] is not True or log["ineligible_reasons"]:
        raise Broken(f"the log marks itself ineligible: eligible={log['eligible']}, reasons "
                     f"{_short(log['ineligible_reasons'])}")


def parse_argv(argv: list[str]) -> tuple[dict[str, str], str | None, str | None]:
    """The harness CLI as `--field value` (or `--field=value`) pairs -> (field flags, --config, --preset)."""
    flags: dict[str, str] = {}
    config_file = preset = None
    i = 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token.partition("=")
        if not FLAG_PATTERN.fullmatch(name):
            raise Broken(f"argv item {_short(token)} is not a --field flag")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise Broken(f"argv flag {name} has no value")
            value = argv[i + 1]
        i += 1 if eq else 2
        field = name[2:].replace("-", "_")
        if field == "config":
            config_file = value
        elif field == "preset":
            preset = value
        else:
            flags[field] = value  # the last occurrence wins, as with argparse
    return flags, config_file, preset


def _flag_value(text: str, like: Any) -> Any:
    """The value the harness's parser gives `text` for a field whose logged value is `like`."""
    if isinstance(like, bool):
        if text.lower() not in BOOL_WORDS:
            raise ValueError(text)
        return BOOL_WORDS[text.lower()]
    if isinstance(like, str):
        return text
    if isinstance(like, int):
        return int(text)  # as argparse's type=int (Python refuses over 4,300 digits); the comparison bounds it
    if isinstance(like, float):
        return float(text)
    raise ValueError(text)


def rule_argv(log: dict[str, Any]) -> None:
    """argv, config_sources and config must tell one story (without re-running the harness's resolution: entries
    may add Config fields)."""
    argv, config, sources = log["argv"], log["config"], log["config_sources"]
    if log["launch"]["command"][1:] != argv or not log["launch"]["command"]:
        raise Broken(f"launch.command {_short(log['launch']['command'])} is not the script followed by argv")
    flags, config_file, preset = parse_argv(argv)
    for field, text in flags.items():
        if field not in config:
            raise Broken(f"argv sets --{field.replace('_', '-')}, which is not a field of config")
        try:
            value = _flag_value(text, config[field])
        except (ValueError, Broken):
            raise Broken(f"argv gives --{field.replace('_', '-')} {_short(text)}, not a valid value for config."
                         f"{field} ({_short(config[field])})") from None
        if not _same_value(value, config[field]):
            raise Broken(f"argv sets --{field.replace('_', '-')} {_short(text)} but config.{field} is "
                         f"{_short(config[field])}")
    if preset not in (None, "auto", "recipe", "cpu_demo"):
        raise Broken(f"argv gives --preset {_short(preset)}, not a preset of the harness")
    # auto resolves by whether CUDA is available: the recipe with a GPU, cpu_demo without
    expected_preset = preset if preset not in (None, "auto") else (
        "recipe" if log["environment"]["gpu_count"] > 0 else "cpu_demo")
    if sources["preset"] != expected_preset:
        raise Broken(f"config_sources.preset is {_short(sources['preset'])} but argv implies {expected_preset!r}")
    if (config_file or None) != (sources["config_file"] or None):
        raise Broken(f"config_sources.config_file is {_short(sources['config_file'])} but argv gives --config "
                     f"{_short(config_file)}")
    overrides = sources["file_overrides"]
    if overrides and not config_file:
        raise Broken("config_sources.file_overrides without a --config file in argv")
    for key, value in overrides.items():
        if key.startswith("_") or key not in config:
            raise Broken(f"config_sources.file_overrides sets {_short(key)}, which is not a field of config")
        if key not in flags and not _same_value(value, config[key]):
            raise Broken(f"the config file sets {key}={_short(value)} but config.{key} is {_short(config[key])}")


def _second_fields(obj: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) of every number stored under a key that names seconds, anywhere in the log."""
    stack = [(obj, False)]
    while stack:
        value, in_seconds = stack.pop()
        if isinstance(value, dict):
            for key, child in value.items():
                is_seconds = in_seconds or key.endswith("seconds")
                if is_seconds and isinstance(child, NUMBER) and not isinstance(child, bool):
                    yield key, child
                stack.append((child, is_seconds))
        elif isinstance(value, list):
            stack.extend((child, in_seconds) for child in value)


def _fields_ending(obj: Any, suffix: str) -> Iterator[tuple[str, Any]]:
    """(key, value) of every number stored under a key ending in `suffix`, anywhere in the log."""
    stack = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
            yield from ((k, v) for k, v in value.items()
                        if k.endswith(suffix) and isinstance(v, NUMBER) and not isinstance(v, bool))
        elif isinstance(value, list):
            stack.extend(value)


def rule_percentages(log: dict[str, Any]) -> None:
    bad = [(key, value) for key, value in _fields_ending(log, "_pct") if not 0 <= value <= 100]
    if bad:
        raise Broken(f"not a percentage in [0, 100]: {_short(bad)}")


def rule_no_negative_seconds(log: dict[str, Any]) -> None:
    negative = [(key, value) for key, value in _second_fields(log) if value < 0]
    if negative:
        raise Broken(f"negative seconds: {_short(negative)}")


def rule_epoch_rows(log: dict[str, Any]) -> None:
    rows, config = log["epochs"], log["config"]
    first = 0 if config["check_first_epoch"] == 0 else 1  # epoch 0 is a check of the untrained network
    if not rows:
        raise Broken("no epoch rows")
    for i, row in enumerate(rows):
        epoch = row["epoch"]
        if epoch != first + i:
            raise Broken(f"epochs[{i}] is epoch {epoch}, expected {first + i} (consecutive from {first})")
        if epoch == 0:
            if row["loss"] is not None or row["lr"] is not None or row["epoch_seconds"] != 0:
                raise Broken("epoch 0 trains nothing: loss and lr null, epoch_seconds 0")
            continue
        if not row["epoch_seconds"] >= MIN_EPOCH_SECONDS:
            raise Broken(f"epoch {epoch}: epoch_seconds {row['epoch_seconds']!r} is not a measured time "
                         f"(at least {MIN_EPOCH_SECONDS} s)")
        if row["loss"] is None or row["lr"] is None:
            raise Broken(f"epoch {epoch} trained but logs no loss or lr")
    if rows[-1]["epoch"] < 1:
        raise Broken("the run trained no epoch")


def rule_check_schedule(log: dict[str, Any]) -> None:
    config = log["config"]
    if config["check_first_epoch"] < 0 or config["check_every_epochs"] < 1 or config["epochs"] < 1:
        raise Broken(f"impossible check schedule: check_first_epoch {config['check_first_epoch']}, "
                     f"check_every_epochs {config['check_every_epochs']}, epochs {config['epochs']}")
    schedule = schedule_of(config)
    for row in log["epochs"]:
        epoch, knn = row["epoch"], row["knn_pct"]
        if (knn is not None) != ab.is_check_epoch(schedule, epoch):
            raise Broken(f"epoch {epoch}: kNN check {'missing' if knn is None else 'outside the schedule'} "
                         f"(checks: epoch {config['check_first_epoch']}, then every {config['check_every_epochs']}, "
                         f"and epoch {config['epochs']})")
        if (row["knn_seconds"] is None) != (knn is None):
            raise Broken(f"epoch {epoch}: knn_seconds {_short(row['knn_seconds'])} with knn_pct {_short(knn)}")


def rule_stop_rule(log: dict[str, Any]) -> None:
    config, rows, result = log["config"], log["epochs"], log["result"]
    schedule = schedule_of(config)
    for row in rows[:-1]:
        if row["knn_pct"] is not None and ab.reached_target(schedule, row["knn_pct"]):
            raise Broken(f"the run did not stop at the first check that reached the target (epoch {row['epoch']}: "
                         f"{row['knn_pct']} %)")
    last = rows[-1]
    if last["knn_pct"] is None:
        raise Broken(f"the run stopped after epoch {last['epoch']}, which has no kNN check")
    if not ab.reached_target(schedule, last["knn_pct"]):
        raise Broken(f"the last check, {last['knn_pct']} % at epoch {last['epoch']}, is below the target "
                     f"{config['target_pct']} %")
    if result["status"] != "reached_target" or result["reached_target"] is not True:
        raise Broken(f"result.status is {_short(result['status'])} (reached_target {result['reached_target']})")
    if result["target_pct"] != config["target_pct"]:
        raise Broken(f"result.target_pct {result['target_pct']} is not config.target_pct {config['target_pct']}")
    if result["knn_at_stop_pct"] != last["knn_pct"]:
        raise Broken(f"result.knn_at_stop_pct {result['knn_at_stop_pct']} is not the last check {last['knn_pct']}")
    if result["epochs_run"] != last["epoch"]:
        raise Broken(f"result.epochs_run {result['epochs_run']} but the last row is epoch {last['epoch']}")


def rule_timed_seconds(log: dict[str, Any]) -> None:
    rows, result = log["epochs"], log["result"]
    total = 0.0
    for row in rows:
        total += row["epoch_seconds"]
        if not close(row["timed_seconds"], total):
            raise Broken(f"epoch {row['epoch']}: timed_seconds {row['timed_seconds']} is not the sum of "
                         f"epoch_seconds so far ({total:.3f})")
    time_to_target = result["time_to_target_seconds"]
    if time_to_target is None or not (close(result["timed_seconds"], total) and close(time_to_target, total)):
        raise Broken(f"result.timed_seconds {result['timed_seconds']} and time_to_target_seconds {time_to_target} "
                     f"are not the sum of epoch_seconds ({total:.3f})")


def rule_untimed_seconds(log: dict[str, Any]) -> None:
    untimed, rows = log["untimed_seconds"], log["epochs"]
    if set(untimed) != {"data_load", "warmup", "knn_checks", "final_eval"}:
        raise Broken(f"untimed_seconds has {_short(sorted(untimed))}, expected data_load, warmup, knn_checks, "
                     "final_eval")
    knn_total = sum(row["knn_seconds"] for row in rows if row["knn_seconds"] is not None)
    if not close(untimed["knn_checks"], knn_total):
        raise Broken(f"untimed_seconds.knn_checks {untimed['knn_checks']} is not the sum of knn_seconds "
                     f"({knn_total:.3f})")
    floor = log["result"]["timed_seconds"] + sum(untimed.values())
    if not log["total_wall_seconds"] >= floor - 1e-3 - 1e-6 * floor:
        raise Broken(f"total_wall_seconds {log['total_wall_seconds']} is less than timed plus untimed seconds "
                     f"({floor:.3f})")


def rule_model_artefact(log: dict[str, Any]) -> None:
    """The run saved its trained model, which `verify` recomputes the accuracy from; the record keeps its sha256."""
    save_model = log["config"].get("save_model")
    if save_model not in MODEL_FORMATS:
        raise Broken(f"config.save_model is {_short(save_model)}: a run that saves no model (--save-model false, or "
                     "a harness without the artefact) can never become a record")
    model = log.get("model")
    if not isinstance(model, dict):
        raise Broken(f"the log names no saved model (model is {_short(model)}): the run did not finish saving it")
    file, kind, sha256, size = (_get(model, key, kinds) for key, kinds in (("file", str), ("format", str),
                                                                          ("sha256", str), ("bytes", int)))
    if file != f"{log['run_id']}.model.pt":
        raise Broken(f"model.file {_short(file)} is not {log['run_id']}.model.pt, the file the harness writes")
    if kind != save_model:
        raise Broken(f"model.format {_short(kind)} is not config.save_model {save_model!r}")
    if not SHA256_PATTERN.fullmatch(sha256) or size < 1:
        raise Broken(f"model.sha256 {_short(sha256)} and model.bytes {size} are not a file's sha256 and size")


Rule = Callable[[dict[str, Any]], None]
RULES: tuple[tuple[str, Rule], ...] = (
    ("source hash", rule_source_hash),
    ("pinned evaluation", rule_pinned_evaluation),
    ("official data", rule_official_data),
    ("race settings", rule_race_settings),
    ("gpu run", rule_gpu_run),
    ("hardware", rule_hardware),
    ("self-declared eligibility", rule_self_declared_eligibility),
    ("argv", rule_argv),
    ("no negative seconds", rule_no_negative_seconds),
    ("percentages", rule_percentages),
    ("epoch rows", rule_epoch_rows),
    ("check schedule", rule_check_schedule),
    ("stop rule", rule_stop_rule),
    ("timed seconds", rule_timed_seconds),
    ("untimed seconds", rule_untimed_seconds),
    ("model artefact", rule_model_artefact),
)


def validate_log(log: dict[str, Any] | str | os.PathLike[str], file: str | None = None) -> Run:
    """Check one run log against every rule; return its summary or raise Refused naming the file and every rule it
    breaks (the first in `str()`, all in `lines()`).

    `log` is a parsed log (dict) or the path of a log file; a path is read with the size limit and its file name
    must be the run_id. `file` names the log in messages (default: the path, or the run_id)."""
    if isinstance(log, (str, os.PathLike)):
        return load_log_file(Path(log), follow_symlinks=True)[1]
    file = file or (str(log.get("run_id"))[:128] if isinstance(log, dict) else "log")
    try:
        check_schema(log)
    except Broken as e:
        raise Refused(f"log schema: {e}", file) from None
    problems = []
    for name, rule in RULES:
        try:
            rule(log)
        except Broken as e:
            problems.append(Refused(f"{name}: {e}", file))
        except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as e:
            # a rule may rely on what an earlier rule refused: that log is refused already
            problems.append(Refused(f"{name}: cannot be checked on this log ({type(e).__name__})", file))
    if problems:
        raise Refused.of(problems)
    rows, env = log["epochs"], log["environment"]
    trained = [row for row in rows if row["epoch"] > 0]
    checks = [row["knn_pct"] for row in rows if row["knn_pct"] is not None]
    epoch_seconds = tuple(float(row["epoch_seconds"]) for row in trained)
    saved = log.get("model") if isinstance(log.get("model"), dict) else {}  # the model rule made it a dict
    model = {key: saved.get(key) for key in ("file", "format", "sha256", "bytes")}
    return Run(file=f"{log['run_id']}.json", run_id=log["run_id"], created_utc=log["created_utc"],
               seed=log["config"]["seed"], epochs_run=rows[-1]["epoch"],
               # from the rows, the evidence; the rules made the stated result equal to them
               time_to_target_seconds=math.fsum(row["epoch_seconds"] for row in rows),
               knn_at_stop_pct=float(checks[-1] if checks else math.nan), gpu_model=gpu_model(env["gpu_name"]),
               world_size=env["world_size"], code_sha256=log["code"]["sha256"], config=log["config"],
               torch_version=env["torch"], cuda_version=str(env["cuda"]),
               model=model,
               epoch_seconds=epoch_seconds,
               losses=tuple(math.nan if row["loss"] is None else float(row["loss"]) for row in trained),
               identity=frozenset({f"run_id {log['run_id']}", f"model {model['sha256']}",
                                   f"epoch_seconds {hashlib.sha256(repr(epoch_seconds).encode()).hexdigest()}"}))


def load_log_file(path: Path, follow_symlinks: bool) -> tuple[bytes, Run]:
    """(raw bytes, validated Run) of a log file, whose name must be `<run_id>.json`."""
    file = str(path)
    try:
        raw = read_bounded(path, MAX_LOG_BYTES, follow_symlinks)
        log = parse_json(raw)
    except Broken as e:
        raise Refused(f"log file: {e}", file) from None
    run = validate_log(log, file)
    if path.name != run.file:
        raise Refused(f"log file: the file is named {path.name!r}, but a log is named after its run_id "
                      f"({run.file!r})", file)
    return raw, run


########################################
#  Rules across runs and across records

def _agree(a: Sequence[float], b: Sequence[float], same: Callable[[float, float], bool]) -> bool:
    # the first values differ for nearly every pair of distinct runs: all() stops there
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def same_run(a: Run, b: Run) -> str | None:
    """What shows that two logs are one run, or None: the same run_id, saved model or epoch times, or the same
    losses within the harness's printed precision. A new id or seed does not make a new run. (Epoch times are not
    compared with a tolerance: a GPU's epoch times can agree within a millisecond by chance.)"""
    shared = {item.split(" ")[0] for item in a.identity & b.identity}
    if _agree(a.losses, b.losses, lambda x, y: abs(x - y) <= LOSS_TOLERANCE):
        shared.add("losses")
    return " and ".join(name for name in ("run_id", "model", "epoch_seconds", "losses") if name in shared) or None


def validate_runs(runs: Sequence[Run]) -> None:
    """Rules across the runs of one record: enough runs, one code, one config, one hardware, distinct runs. Raises
    Refused listing every problem."""
    problems = []
    if len(runs) < MIN_RUNS:
        problems.append(Refused(f"runs: a record needs at least {MIN_RUNS} runs, got {len(runs)}"))
    ref = runs[0]
    for run in runs[1:]:
        if run.code_sha256 != ref.code_sha256:
            problems.append(Refused(f"one code: sha256 {run.code_sha256[:12]} differs from {ref.file}'s "
                                    f"{ref.code_sha256[:12]}", run.file))
        keys = sorted((set(run.config) | set(ref.config)) - PER_RUN_CONFIG_KEYS)
        differ = [k for k in keys if not _same_value(run.config.get(k), ref.config.get(k))
                  or (k in run.config) != (k in ref.config)]
        if differ:
            diffs = ", ".join(f"{k}={_short(run.config.get(k))} vs {_short(ref.config.get(k))}" for k in differ)
            problems.append(Refused(f"one config: differs from {ref.file}'s: {diffs}", run.file))
        if run.hardware.casefold() != ref.hardware.casefold():
            problems.append(Refused(f"one hardware: {run.hardware!r} differs from {ref.file}'s {ref.hardware!r}",
                                    run.file))
    seeds = [r.seed for r in runs]
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        problems.append(Refused(f"distinct runs: seed {', '.join(map(str, dupes))} appears twice"))
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            evidence = same_run(a, b) or (a.file == b.file and "file name")
            if evidence:
                problems.append(Refused(f"distinct runs: {b.file} is the same run as {a.file} (same {evidence})",
                                        b.file))
    if problems:
        raise Refused.of(problems)


def hardware_key(record: Record) -> str:
    return record.hardware.casefold()


def by_hardware(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by hardware (GPU model × count, case-insensitive), fastest first; a group is titled as its
    first record spelled it."""
    groups: dict[str, list[Record]] = {}
    for record in sorted(records, key=lambda r: (r.date, r.folder.name)):
        groups.setdefault(hardware_key(record), []).append(record)
    titled = {group[0].hardware: sorted(group, key=lambda r: (r.mean_time, r.folder.name))
              for group in groups.values()}
    return dict(sorted(titled.items(), key=lambda item: item[0].casefold()))


def group_of(record: Record, records: Sequence[Record]) -> list[Record]:
    key = hardware_key(record)
    return next((g for g in by_hardware(records).values() if hardware_key(g[0]) == key), [])


def previous_record(record: Record, records: Sequence[Record]) -> Record | None:
    """The record this one beat: each record is faster than all before it on its hardware, so the previous one is
    the next slower in the same group."""
    group = [r for r in group_of(record, [*records, record]) if r.folder.name != record.folder.name]
    slower = [r for r in group if r.mean_time > record.mean_time]
    return slower[0] if slower else None


def record_problems(records: Sequence[Record]) -> list[str]:
    """Rules between records: no run in two records, and on each hardware every record is faster than every record
    dated before it (what `add` enforced when it was added)."""
    problems = []
    for i, a in enumerate(records):
        for b in records[i + 1:]:
            for run_a in a.runs:
                for run_b in b.runs:
                    evidence = same_run(run_a, run_b)
                    if evidence:
                        problems.append(f"one run, one record: {b.folder.name}/{run_b.file} is the same run as "
                                        f"{a.folder.name}/{run_a.file} (same {evidence})")
    for hardware, group in by_hardware(records).items():
        for a in group:
            for b in group:
                if a.date < b.date and not b.mean_time < a.mean_time:
                    problems.append(f"faster records: {b.folder.name} ({b.mean_time:.3f} s) is not faster than the "
                                    f"earlier {a.folder.name} ({a.mean_time:.3f} s) on {hardware}")
                elif a.date == b.date and a.folder.name < b.folder.name and a.mean_time == b.mean_time:
                    problems.append(f"faster records: {a.folder.name} and {b.folder.name} tie on {hardware}")
    return problems


def today_utc() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def date_problem(date: str, runs: Sequence[Run]) -> str | None:
    """A record may be dated the day its latest run was made (UTC), or later."""
    latest = max(runs, key=lambda r: r.created_utc)
    if latest.created_utc[:10] > date:
        return f"record date {date} is before run {latest.run_id} was made ({latest.created_utc})"
    return None


def date_problems(date: str, runs: Sequence[Run], today: datetime.date) -> list[str]:
    """A record's date: a real YYYY-MM-DD, not after today (UTC, with a day's grace for time zones: a record dated
    ahead would refuse every later record on its hardware), and not before any of its runs was made."""
    try:
        if not DATE_PATTERN.fullmatch(date):
            raise ValueError(date)
        day = datetime.date.fromisoformat(date)
    except ValueError:
        return [f"date {_short(date)} is not a real date as YYYY-MM-DD"]
    problems = []
    if day > today + datetime.timedelta(days=1):
        problems.append(f"date {date} is in the future (today is {today.isoformat()} UTC)")
    return problems + [p for p in [date_problem(date, runs)] if p]


########################################
#  Verification: the accuracy recomputed from the saved models

# What `verify` stores per record (the inputs of the "verification" object in record.json; record.json adds what
# follows from them and from the logs).
VERIFICATION_FIELDS = (("device", str), ("torch", str), ("tolerance_pct", NUMBER), ("batch_tolerance", NUMBER),
                       ("runs", list))
VERIFIED_RUN_FIELDS = (("log", str), ("model_sha256", str), ("reported_knn_pct", NUMBER),
                       ("recomputed_knn_pct", NUMBER), ("numerics", str), ("batch_max_deviation", NUMBER),
                       ("time_floor", dict))
TIME_FLOOR_FIELDS = (("gpu", str), ("gpu_known", bool), ("peak_tflops", NUMBER), ("world_size", int),
                     ("n_views", int), ("trained_images_per_epoch", int), ("forward_flops_32px", int),
                     ("fastest_epoch", int), ("fastest_epoch_seconds", NUMBER), ("fastest_floor_seconds", NUMBER))


def verification_of(results: Sequence[verify.Verification]) -> dict[str, Any]:
    """The verification object a record stores, from verify's results for its runs (in the record's order)."""
    first = results[0]
    return {
        "device": first.device, "torch": first.torch_version, "tolerance_pct": first.tolerance_pct,
        "batch_tolerance": first.batch_check.tolerance,
        "runs": [{"log": f"{v.run_id}.json", "model_sha256": v.model_sha256, "reported_knn_pct": v.logged_knn_pct,
                  "recomputed_knn_pct": v.recomputed_knn_pct, "numerics": v.numerics,
                  "batch_max_deviation": v.batch_check.max_relative_deviation,
                  "time_floor": {key: getattr(v.time_floor, key) for key, _ in TIME_FLOOR_FIELDS}} for v in results],
    }


def trained_images_per_epoch(config: dict[str, Any]) -> int:
    n_train = config["train_subset"] or TRAIN_IMAGES
    return n_train - (n_train % config["batch_size"] if config.get("drop_last") else 0)


def floor_seconds(floor: dict[str, Any], px: int) -> float:
    """An epoch's least possible time at view size px: its training FLOPs (images x views x 3 forward passes of the
    saved model) at the GPUs' peak rate. Below 32 px the 32 px count is scaled by area, a lower bound (stride-2 stages
    round their outputs up), so this floor never exceeds the one verify applied."""
    return (floor["trained_images_per_epoch"] * floor["n_views"] * 3 * floor["forward_flops_32px"]
            / (floor["peak_tflops"] * 1e12 * floor["world_size"])) * (px / 32) ** 2


def view_sizes(run: Run) -> list[int]:
    """The view size of each trained epoch (progressive resolution: low_res_px for the first low_res_epochs)."""
    views = types.SimpleNamespace(low_res_px=run.config.get("low_res_px", 32),
                                  low_res_epochs=run.config.get("low_res_epochs", 0))
    return [ab.view_px(views, epoch) for epoch in range(len(run.epoch_seconds))]


def _floor_problems(run: Run, floor: dict[str, Any]) -> list[str]:
    peak, known = verify.gpu_peak(run.gpu_model)
    expected = {"gpu": peak.model, "gpu_known": known, "peak_tflops": peak.tflops, "world_size": run.world_size,
                "n_views": verify.TRAINED_VIEWS,
                "trained_images_per_epoch": trained_images_per_epoch(run.config)}
    differ = [f"{key} {_short(floor[key])} (expected {_short(value)})" for key, value in expected.items()
              if not _same_value(floor[key], value)]
    if differ:
        return [f"time floor of {run.file}: {', '.join(differ)}; the GPU peak table or the run changed: verify it "
                "again"]
    epoch = floor["fastest_epoch"]
    logged = run.epoch_seconds[epoch - 1] if 1 <= epoch <= len(run.epoch_seconds) else None
    if logged is None or not close(floor["fastest_epoch_seconds"], logged):
        return [f"time floor of {run.file}: epoch {epoch} took {floor['fastest_epoch_seconds']} s by the "
                f"verification, {logged} s by the log"]
    if not floor["forward_flops_32px"] > 0 or not floor["fastest_floor_seconds"] > 0:
        return [f"time floor of {run.file}: no FLOP count"]
    floors = [floor_seconds(floor, px) for px in view_sizes(run)]
    floors[epoch - 1] = max(floors[epoch - 1], floor["fastest_floor_seconds"])  # verify's own count for that epoch
    for e, (seconds, least) in enumerate(zip(run.epoch_seconds, floors), start=1):
        if seconds < least:
            return [f"time floor of {run.file}: epoch {e} took {seconds:.4g} s, less than the {least:.4g} s its "
                    f"training FLOPs need at the {floor['gpu']} peak of {floor['peak_tflops']:g} TFLOPS: physically "
                    "impossible"]
    return []


def verification_problems(verification: Any, runs: Sequence[Run]) -> list[str]:
    """Whether a stored verification holds for these runs: the same logs and models, each recomputed accuracy within
    the tolerance of the logged one, batch-independent features, and no epoch faster than its FLOP floor. What the
    models gave cannot be recomputed without them; everything that follows from it and the logs is checked here."""
    try:
        fields = {key: _get(verification, key, kinds) for key, kinds in VERIFICATION_FIELDS}
        entries = [{key: _get(entry, key, kinds) for key, kinds in VERIFIED_RUN_FIELDS} for entry in fields["runs"]]
        for entry in entries:
            entry["time_floor"] = {key: _get(entry["time_floor"], key, kinds) for key, kinds in TIME_FLOOR_FIELDS}
    except Broken as e:
        return [f"verification: {e}"]
    if not (GPU_NAME_PATTERN.fullmatch(fields["device"]) and VERSION_PATTERN.fullmatch(fields["torch"])):
        return [f"verification: device {_short(fields['device'])} or torch {_short(fields['torch'])} is not a "
                "plain name"]
    if not 0 <= fields["tolerance_pct"] <= verify.ACCURACY_TOLERANCE_PCT or not (
            0 < fields["batch_tolerance"] <= verify.BATCH_TOLERANCE):
        return [f"verification: tolerances {fields['tolerance_pct']} points and {fields['batch_tolerance']} are not "
                f"within verify's ({verify.ACCURACY_TOLERANCE_PCT} and {verify.BATCH_TOLERANCE})"]
    if [entry["log"] for entry in entries] != [run.file for run in runs]:
        return [f"verification: lists {_short([entry['log'] for entry in entries])}, not the record's logs"]
    problems = []
    for run, entry in zip(runs, entries):
        if not GPU_NAME_PATTERN.fullmatch(entry["numerics"]):
            problems.append(f"verification of {run.file}: numerics {_short(entry['numerics'])} is not a plain name")
        if entry["model_sha256"] != run.model["sha256"]:
            problems.append(f"verification of {run.file}: model sha256 {_short(entry['model_sha256'])} is not the "
                            f"logged model's {run.model['sha256']}")
        if entry["reported_knn_pct"] != run.knn_at_stop_pct:
            problems.append(f"verification of {run.file}: reported kNN {entry['reported_knn_pct']} is not the log's "
                            f"{run.knn_at_stop_pct}")
        difference = entry["recomputed_knn_pct"] - run.knn_at_stop_pct
        if not 0 <= entry["recomputed_knn_pct"] <= 100 or abs(difference) > fields["tolerance_pct"] + 1e-9:
            problems.append(f"verification of {run.file}: the saved model gives {entry['recomputed_knn_pct']} %, the "
                            f"log says {run.knn_at_stop_pct} % (tolerance {fields['tolerance_pct']} points)")
        if not 0 <= entry["batch_max_deviation"] <= fields["batch_tolerance"]:
            problems.append(f"verification of {run.file}: features depend on the batch (deviation "
                            f"{entry['batch_max_deviation']:.3g} > {fields['batch_tolerance']:g})")
        problems += _floor_problems(run, entry["time_floor"])
    return problems


def verification_json(verification: dict[str, Any], runs: Sequence[Run]) -> dict[str, Any]:
    """The stored verification with what follows from it: each run's difference, the floor of an epoch at each view
    size it trained at, and the margin of its fastest epoch (how many times its floor it took)."""
    out = {key: verification[key] for key, _ in VERIFICATION_FIELDS if key != "runs"}
    out["runs"] = []
    for run, entry in zip(runs, verification["runs"]):
        floor = {key: entry["time_floor"][key] for key, _ in TIME_FLOOR_FIELDS}
        floor.update(margin=floor["fastest_epoch_seconds"] / floor["fastest_floor_seconds"],
                     epoch_floor_seconds={str(px): floor_seconds(floor, px) for px in sorted(set(view_sizes(run)))})
        out["runs"].append(dict({key: entry[key] for key, _ in VERIFIED_RUN_FIELDS}, time_floor=floor,
                                difference_pct=entry["recomputed_knn_pct"] - entry["reported_knn_pct"]))
    out["least_floor_margin"] = min(entry["time_floor"]["margin"] for entry in out["runs"])
    return out


def recompute(logs: Sequence[dict[str, Any]], models_dir: Path, data_dir: str,
              device: str) -> list[verify.Verification]:
    """verify's recomputation of each run (one data load for all); Refused listing every run it refuses."""
    try:
        data = verify.load_data(data_dir, ab.resolve_device(dataclasses.replace(ab.Config(), device=device)))
    except ab.HarnessError as e:
        raise Refused(f"verify: {e}") from None
    results, problems = [], []
    for log in logs:
        try:
            results.append(verify.verify_run(log, data=data, models_dir=str(models_dir), require_official=True))
        except ab.HarnessError as e:
            problems.append(Refused(f"verify: {e}", f"{log['run_id']}.json"))
    if problems:
        raise Refused.of(problems)
    return results


########################################
#  Records on disk

def scan_records(records_dir: Path) -> tuple[list[Path], list[str]]:
    """(record folders, problems with other entries). Dot-entries are staging leftovers of a crashed add: not
    records, ignored by git, and removed by the next add or render."""
    if not records_dir.is_dir():
        return [], []
    folders, problems = [], []
    for entry in sorted(os.scandir(records_dir), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink():
            problems.append(f"{entry.path} is a symbolic link: records hold plain folders and files")
        elif entry.is_dir(follow_symlinks=False):
            folders.append(Path(entry.path))
        elif not (entry.name == "README.md" and entry.is_file(follow_symlinks=False)):
            problems.append(f"{entry.path} is not a record folder: records/ holds record folders and README.md")
    return folders, problems


def _meta_field(meta: dict[str, Any], key: str, kind: Any) -> Any:
    try:
        return _get(meta, key, kind)
    except Broken as e:
        raise Refused(f"record.json: {e}") from None


def load_record(folder: Path) -> Record:
    """Read record.json for what the submitter chose (name, date, description, logs) and what `verify` recomputed,
    and check all of it as `add` and `verify` did: the logs, the date, the description, the verification."""
    where = str(folder)
    try:
        meta = parse_json(read_bounded(folder / "record.json", MAX_RECORD_JSON_BYTES, follow_symlinks=False))
        check_json_values(meta)
    except Broken as e:
        raise Refused(f"record.json {e}", where) from None
    if not isinstance(meta, dict):
        raise Refused("record.json is not a JSON object", where)
    name, date = _meta_field(meta, "name", str), _meta_field(meta, "date", str)
    description, logs = _meta_field(meta, "description", str), _meta_field(meta, "logs", list)
    verification = _meta_field(meta, "verification", (dict, NONE))
    if not (NAME_PATTERN.fullmatch(name) and DATE_PATTERN.fullmatch(date)) or folder.name != f"{date}_{name}":
        raise Refused(f"record folder: the name does not match record.json date and name ({date}_{name})", where)
    problem = description_problem(description)
    if problem:
        raise Refused(f"record.json: {problem}", where)
    if not all(isinstance(f, str) and RUN_ID_PATTERN.fullmatch(f) and f.endswith(".json") for f in logs) or (
            len(set(logs)) != len(logs)) or set(logs) & {*GENERATED_FILES, SUBMITTER_FILE}:
        raise Refused(f"record.json: logs {_short(logs)} are not distinct plain .json file names", where)
    expected = {*logs, *GENERATED_FILES, SUBMITTER_FILE}
    for entry in os.scandir(folder):
        if entry.is_symlink():
            raise Refused(f"no symlinks: {entry.name} is a symbolic link", where)
        if entry.name not in expected or not entry.is_file(follow_symlinks=False):
            raise Refused(f"no unlisted files: {entry.name} is not a log listed in record.json nor a record file",
                          where)
    if not (folder / SUBMITTER_FILE).is_file():
        raise Refused(f"{SUBMITTER_FILE} is missing: the submitter's note is part of a record", where)
    loaded, problems = [], []
    for log_name in logs:
        try:
            loaded.append(load_log_file(folder / log_name, follow_symlinks=False)[1])
        except Refused as e:
            problems.append(e)
    if problems:
        raise Refused.of(problems)
    try:
        validate_runs(loaded)
    except Refused as e:
        raise Refused.of([Refused(str(p), f"{where}/{p.file}" if p.file else where) for p in e.each()]) from None
    problems = [Refused(p, where) for p in date_problems(date, loaded, today_utc())]
    if verification is not None:
        problems += [Refused(p, where) for p in verification_problems(verification, loaded)]
    if problems:
        raise Refused.of(problems)
    return Record(folder=folder, name=name, date=date, description=description, runs=tuple(loaded),
                  verification=verification)


def load_records(records_dir: Path) -> list[Record]:
    """Every record, validated alone and against the others; the first problem is raised."""
    folders, problems = scan_records(records_dir)
    if problems:
        raise Refused(problems[0])
    records = [load_record(folder) for folder in folders]
    problems = record_problems(records)
    if problems:
        raise Refused(problems[0])
    return records


########################################
#  Generated text

def format_duration(seconds: float) -> str:
    """One format everywhere: '42.1 s', '4 min 02.3 s', '1 h 02 min 03.4 s'."""
    minutes, secs = divmod(seconds, 60.0)
    hours, minutes = divmod(int(minutes), 60)
    if hours:
        return f"{hours} h {minutes:02d} min {secs:04.1f} s"
    if minutes:
        return f"{minutes} min {secs:04.1f} s"
    return f"{secs:.1f} s"


def format_p(p: float) -> str:
    return f"{p:.2g}"


def markdown_cell(text: str) -> str:
    """Any text as one table cell: printable ASCII on one line, '|' escaped. `add` and `check` refuse descriptions
    that need this; it keeps a hand-edited record.json from breaking leaderboard.md before `check` reports it."""
    printable = "".join(c if " " <= c <= "~" else " " for c in text)
    return " ".join(printable.split()).replace("\\", "\\\\").replace("|", "\\|")


def record_json(record: Record, records: Sequence[Record]) -> str:
    time_mean, time_std = stats.summarize(record.times)
    reported_mean, reported_std = stats.summarize(record.reported_accs)
    recomputed = record.recomputed_accs
    acc_mean, acc_std = stats.summarize(recomputed) if recomputed else (None, None)
    previous = previous_record(record, records)
    summary = {
        "name": record.name,
        "date": record.date,
        "description": record.description,
        "hardware": record.hardware,
        "gpu_model": record.runs[0].gpu_model,
        "world_size": record.runs[0].world_size,
        "n_runs": len(record.runs),
        "target_pct": TARGET_PCT,
        "time_mean_seconds": time_mean,
        "time_std_seconds": time_std,
        "verified": recomputed is not None,
        "knn_mean_pct": acc_mean,  # recomputed from the saved models; null until verified
        "knn_std_pct": acc_std,
        "p_value_knn_gt_target": stats.one_sided_ttest_ge(recomputed, TARGET_PCT) if recomputed else None,
        "reported_knn_mean_pct": reported_mean,  # what the runs' own processes computed
        "reported_knn_std_pct": reported_std,
        "code_sha256": record.runs[0].code_sha256,
        "previous_record": previous.folder.name if previous else None,
        "logs": [r.file for r in record.runs],
        "models": [dict(log=r.file, **r.model) for r in record.runs],
        "verification": verification_json(record.verification, record.runs) if record.verification else None,
    }
    return json.dumps(summary, indent=2) + "\n"


def statistics_md(record: Record, records: Sequence[Record]) -> str:
    time_mean, time_std = stats.summarize(record.times)
    accs = record.recomputed_accs or record.reported_accs
    acc_mean, acc_std = stats.summarize(accs)
    p = stats.one_sided_ttest_ge(accs, TARGET_PCT)
    versions = sorted({f"torch {r.torch_version}, CUDA {r.cuda_version}" for r in record.runs})
    verification = verification_json(record.verification, record.runs) if record.verification else None
    lines = [
        f"# Statistics: {record.name} ({record.date})",
        "",
        ("Generated by `python tools/leaderboard.py` from the run logs in this folder and the verification in "
         "record.json; `python tools/leaderboard.py check` fails if it no longer matches them. Do not edit."),
        "",
        f"- Hardware: {record.hardware}",
        f"- Code: sha256 `{record.runs[0].code_sha256}`",
        f"- Versions: {'; '.join(versions)}",
        f"- Target: kNN k={KNN_K} test accuracy >= {TARGET_PCT} %",
        (f"- Verified: yes, the accuracy recomputed from the saved models by `python tools/leaderboard.py verify` on "
         f"{verification['device']} (torch {verification['torch']})" if verification else
         "- Verified: **no**. The accuracy below is what the runs reported, not yet recomputed from their saved "
         "models (`python tools/leaderboard.py verify`)"),
        "",
        "## Runs",
        "",
        "| Log | Seed | Epochs run | Time to target (s) | kNN at stop, reported (%) | kNN recomputed (%) "
        "| Fastest epoch vs FLOP floor | Model sha256 |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(record.runs):
        entry = verification["runs"][i] if verification else None
        recomputed = f"{entry['recomputed_knn_pct']:.2f}" if entry else "not verified"
        margin = f"{entry['time_floor']['margin']:.1f}x" if entry else "not verified"
        lines.append(f"| {r.file} | {r.seed} | {r.epochs_run} | {r.time_to_target_seconds:.3f} "
                     f"| {r.knn_at_stop_pct:.2f} | {recomputed} | {margin} | `{r.model['sha256'][:16]}` |")
    what = "recomputed" if verification else "reported, not verified"
    lines += [
        "",
        "## Summary",
        "",
        "| | Mean | Std | n |",
        "|---|---:|---:|---:|",
        f"| Time to target (s) | {time_mean:.3f} | {time_std:.3f} | {len(record.runs)} |",
        f"| kNN at stop, {what} (%) | {acc_mean:.3f} | {acc_std:.3f} | {len(record.runs)} |",
        "",
        (f"One-sided one-sample t-test of H0: mean kNN accuracy at stop ({what}) <= {TARGET_PCT} % against "
         f"H1: mean > {TARGET_PCT} % (df = {len(record.runs) - 1}): p = {format_p(p)}."),
        "",
    ]
    if verification:
        floor = verification["runs"][0]["time_floor"]
        lines += [
            "## Verification",
            "",
            (f"Each run's kNN at stop was recomputed in a fresh process with the canonical harness's data loading, "
             f"feature extraction and kNN, from the saved model whose sha256 the log names, on "
             f"{verification['device']} with torch {verification['torch']} (numerics: "
             f"{', '.join(sorted({e['numerics'] for e in verification['runs']}))}): within "
             f"{verification['tolerance_pct']:g} "
             f"points of the logged value (largest difference "
             f"{max(abs(e['difference_pct']) for e in verification['runs']):.2f}). Features computed in other "
             f"batches differ by at most {max(e['batch_max_deviation'] for e in verification['runs']):.1e} of their "
             f"norm (tolerance {verification['batch_tolerance']:g})."),
            "",
            (f"FLOP floor: an epoch trains {floor['trained_images_per_epoch']:,} images x {floor['n_views']} views x 3 "
             f"forward passes of {floor['forward_flops_32px']:,} FLOPs (32 px) on {floor['world_size']} x "
             f"{floor['gpu']} at a peak of {floor['peak_tflops']:g} TFLOPS"
             f"{'' if floor['gpu_known'] else ' (GPU not in the table: the highest known peak)'}: at least "
             f"{floor_seconds(floor, 32):.4g} s at 32 px. The fastest epoch of any run took "
             f"{verification['least_floor_margin']:.1f}x its floor."),
            "",
        ]
    lines += ["## Versus the previous record on this hardware", ""]
    previous = previous_record(record, records)
    if previous is None:
        lines.append(f"First record on {record.hardware}.")
    else:
        w = stats.welch(record.times, previous.times)
        lines += [
            (f"Previous record: [{previous.folder.name}](../{previous.folder.name}/), mean time to target "
             f"{previous.mean_time:.3f} s over {len(previous.runs)} runs."),
            "",
            (f"Delta in mean time to target: {w['diff']:+.3f} s ({100.0 * w['diff'] / previous.mean_time:+.1f} %); "
             f"Welch's t-test: 95% CI [{w['ci95_low']:+.3f}, {w['ci95_high']:+.3f}] s, "
             f"two-sided p = {format_p(w['p_value'])}, df = {w['dof']:.1f}."),
        ]
    return "\n".join(lines) + "\n"


def readme_stub(name: str, description: str) -> str:
    return (f"# {name}\n\n{description}\n\n"
            "_Submitter: say what changed versus the previous record, why it is faster, and the exact command "
            "that produced these logs._\n")


def render_leaderboard(records: Sequence[Record], leaderboard_path: Path, records_dir: Path) -> str:
    base = leaderboard_path.resolve().parent
    rules_link = os.path.relpath(records_dir.resolve() / "README.md", base)
    lines = [
        "# airbench-ssl leaderboard",
        "",
        (f"Wall-clock time for SimCLR to reach {TARGET_PCT} % cosine kNN (k={KNN_K}) accuracy on the official "
         f"CIFAR-10 test set, training on the 50k train set only, judged by the harness's own evaluation. A record "
         f"is at least {MIN_RUNS} runs that were not cherry-picked, with one code hash and one config (seeds aside), "
         "all reaching the target under a check schedule fixed in advance; times are compared only on the same "
         "hardware (GPU model × number of GPUs). The accuracy shown is recomputed from each run's saved model in a "
         "fresh process with the canonical evaluation (`python tools/leaderboard.py verify`); a record not yet "
         "verified shows no accuracy. "
         f"The full rules are in [records/README.md]({rules_link}). This file is generated by "
         "`python tools/leaderboard.py render` from `records/`, and CI runs `python tools/leaderboard.py check`: "
         "do not edit it by hand."),
        "",
        "## Reference (published, not records of this harness)",
        "",
        (f"Published results of the reference implementation, {REFERENCE_SOURCE}, timed by its authors with their "
         "own data pipeline: a yardstick, not entries to beat."),
        "",
        "| Recipe | Hardware | Epochs | kNN k=10 | Time | Source |",
        "|---|---|---:|---:|---:|---|",
    ]
    lines += [f"| {recipe} | {REFERENCE_HARDWARE} | {epochs} | {acc} | {time} | {REFERENCE_SOURCE} |"
              for recipe, epochs, acc, time in REFERENCE_ROWS]
    lines += ["", "## Records", ""]
    groups = by_hardware(records)
    if not groups:
        lines.append("No records yet.")
    for hardware, group in groups.items():
        lines += [
            f"### {hardware}",
            "",
            ("| # | Time to target (mean ± std) | Runs | kNN at stop, recomputed (mean ± std) "
             f"| p (kNN > {TARGET_PCT}) | Verified on | Description | Date | Record |"),
            "|---:|---:|---:|---:|---:|---|---|---|---|",
        ]
        for rank, r in enumerate(group, start=1):
            time_mean, time_std = stats.summarize(r.times)
            link = os.path.relpath(r.folder.resolve(), base)
            recomputed = r.recomputed_accs
            if recomputed:
                acc_mean, acc_std = stats.summarize(recomputed)
                knn, p = (f"{acc_mean:.2f} ± {acc_std:.2f} %",
                          format_p(stats.one_sided_ttest_ge(recomputed, TARGET_PCT)))
                device = markdown_cell(r.verification["device"])  # type: ignore[index]
            else:
                knn, p, device = "unverified", "–", "not verified"
            lines.append(f"| {rank} | {format_duration(time_mean)} ± {time_std:.1f} s | {len(r.runs)} | {knn} | {p} "
                         f"| {device} | {markdown_cell(r.description)} | {r.date} | [{r.folder.name}]({link}/) |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


########################################
#  Safe writes

@contextlib.contextmanager
def locked(records_dir: Path) -> Iterator[None]:
    """Exclusive flock on the records folder itself: no lock file to track, and the kernel drops it on a crash."""
    records_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(records_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_pattern(path: Path) -> str:
    return f".{path.name}.*.tmp"


def stage_file(path: Path, text: str, staging: Path | None = None) -> Path:
    """Write text to a temp file beside path, or named `staging` plus a random suffix (same filesystem either way,
    so os.replace is atomic), and return its name."""
    where, prefix = (staging.parent, f"{staging.name}-") if staging else (path.parent, f".{path.name}.")
    fd, tmp = tempfile.mkstemp(dir=where, prefix=prefix, suffix=".tmp")
    os.close(fd)
    try:
        write_synced(Path(tmp), text.encode("utf-8"))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the leaderboard is a normal repository file
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def ensure_replaceable(path: Path) -> None:
    """Refuse before writing anything if `path` could not be replaced by a file (e.g. it is a folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise Refused(f"{path} exists and is not a regular file: move it away, then run the command again")


def remove_leftovers(records_dir: Path, leaderboard_path: Path) -> None:
    """Staging folders and temp files of a crashed add or render; only called under the lock, so no running
    command owns them."""
    for p in records_dir.glob(f"{STAGING_PREFIX}*"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    for p in leaderboard_path.parent.glob(temp_pattern(leaderboard_path)):
        if not p.is_dir() or p.is_symlink():
            p.unlink(missing_ok=True)


########################################
#  Commands

def description_problem(description: str) -> str | None:
    if not DESCRIPTION_PATTERN.fullmatch(description) or description != description.strip():
        return (f"description {description!r}: one line of 1 to {MAX_DESCRIPTION_CHARS} printable ASCII "
                "characters, without '|' or surrounding spaces")
    return None


def check_submission(name: str, description: str, date: str, today: datetime.date) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise Refused(f"--name {name!r}: use up to 64 letters, digits, '-' and '_', starting with a letter or digit")
    try:
        if not DATE_PATTERN.fullmatch(date):
            raise ValueError(date)
        day = datetime.date.fromisoformat(date)
    except ValueError:
        raise Refused(f"--date {date!r}: expected a real date as YYYY-MM-DD") from None
    if day > today + datetime.timedelta(days=1):
        raise Refused(f"--date {date} is in the future")
    problem = description_problem(description)
    if problem:
        raise Refused(f"--{problem}")


def load_logs(paths: Sequence[Path]) -> list[tuple[bytes, Run]]:
    """Every log validated; Refused listing every rule every log breaks."""
    loaded, problems = [], []
    for path in paths:
        try:
            loaded.append(load_log_file(path, follow_symlinks=True))
        except Refused as e:
            problems.append(e)
    if problems:
        raise Refused.of(problems)
    return loaded


def verified(logs: Sequence[dict[str, Any]], runs: Sequence[Run], models_dir: Path, data_dir: str,
             device: str) -> dict[str, Any]:
    """The verification of these runs from their saved models, held to the rules `check` applies to it."""
    verification = verification_of(recompute(logs, models_dir, data_dir, device))
    problems = verification_problems(verification, runs)
    if problems:
        raise Refused.of([Refused(p) for p in problems])
    return verification


def add(log_paths: Sequence[Path], name: str, description: str, date: str, records_dir: Path,
        leaderboard_path: Path, models_dir: Path | None = None, data_dir: str | None = None,
        device: str = "auto") -> Record:
    """Validate the logs and create the record; with models_dir and data_dir, verified (its accuracy recomputed
    from the saved models) before anything is written."""
    check_submission(name, description, date, today_utc())
    if models_dir is None and data_dir is not None:
        raise Refused("--data-dir is for verification: give --models DIR (the runs' .model.pt files) too")
    loaded = load_logs(log_paths)
    runs = [run for _, run in loaded]
    validate_runs(runs)
    problems = date_problems(date, runs, today_utc())
    if problems:
        raise Refused.of([Refused(f"--date: {p}") for p in problems])
    verification = None
    if models_dir is not None:  # slow: before the lock, which other adds wait for
        verification = verified([parse_json(raw) for raw, _ in loaded], runs, models_dir, data_dir or "", device)

    with locked(records_dir):
        remove_leftovers(records_dir, leaderboard_path)
        try:
            existing = load_records(records_dir)
        except Refused as e:
            raise Refused(f"an existing record no longer validates ({e.line()}); run `check` and fix it first") from e
        ensure_replaceable(leaderboard_path)
        folder = records_dir / f"{date}_{name}"
        if os.path.lexists(folder):
            raise Refused(f"{folder} already exists")
        for record in existing:
            for old in record.runs:
                for run in runs:
                    evidence = same_run(run, old)
                    if evidence:
                        raise Refused(f"one run, one record: this is the same run as {record.folder.name}/{old.file} "
                                      f"(same {evidence})", run.file)
        new = Record(folder=folder, name=name, date=date, description=description, runs=tuple(runs),
                     verification=verification)
        group = [r for r in group_of(new, [*existing, new]) if r is not new]
        if group and not new.mean_time < group[0].mean_time:
            raise Refused(f"faster records: not faster than {group[0].folder.name} ({group[0].mean_time:.3f} s) on "
                          f"{group[0].hardware}: mean time to target {new.mean_time:.3f} s")
        latest = max(group, key=lambda r: r.date, default=None)
        if latest is not None and date < latest.date:
            raise Refused(f"--date {date} is before {latest.folder.name}: records on one hardware are dated in the "
                          "order they were added")
        records = [*existing, new]
        problems = record_problems(records)
        if problems:
            raise Refused(problems[0])

        # Everything is computed before anything is written; the new folder appears by one rename.
        files = {run.file: raw for run, (raw, _) in zip(runs, loaded)}
        files["record.json"] = record_json(new, records).encode("utf-8")
        files["statistics.md"] = statistics_md(new, records).encode("utf-8")
        files[SUBMITTER_FILE] = readme_stub(name, description).encode("utf-8")
        board = render_leaderboard(records, leaderboard_path, records_dir)
        staging = Path(tempfile.mkdtemp(dir=records_dir, prefix=f"{STAGING_PREFIX}{name}-"))
        try:
            for file_name, data in files.items():
                write_synced(staging / file_name, data)
            os.chmod(staging, 0o755)
            staged_board = stage_file(leaderboard_path, board)
            try:
                os.rename(staging, folder)
                try:
                    os.replace(staged_board, leaderboard_path)
                except BaseException:
                    os.rename(folder, staging)  # undo: the record appears only together with its leaderboard row
                    raise
            except BaseException:
                staged_board.unlink(missing_ok=True)
                raise
            # Killed between the two renames, add leaves a valid record and a stale leaderboard.md: `check` reports
            # it and the next `render` or `add` rewrites it.
            sync_folder(records_dir)
            sync_folder(leaderboard_path.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return new


def _record_folder(folder: Path, records_dir: Path) -> Path:
    if folder.resolve().parent != records_dir.resolve() or not folder.is_dir():
        raise Refused(f"{folder} is not a record folder in {records_dir}")
    return records_dir / folder.resolve().name


def _record_logs(record: Record) -> list[dict[str, Any]]:
    try:
        return [parse_json(read_bounded(record.folder / run.file, MAX_LOG_BYTES, follow_symlinks=False))
                for run in record.runs]
    except Broken as e:
        raise Refused(f"log file: {e}", str(record.folder)) from None


def rewrite_generated(records: Sequence[Record], records_dir: Path, leaderboard_path: Path) -> int:
    """Replace every generated file (record.json, statistics.md, leaderboard.md) that differs from what the records
    give, each atomically, record.json first (it holds the verification); -> the number of files replaced. A crash
    in between leaves files that `check` reports and the next `render` rewrites."""
    staged = []
    try:
        for record in records:
            for file_name, text in (("record.json", record_json(record, records)),
                                    ("statistics.md", statistics_md(record, records))):
                path = record.folder / file_name
                if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
                    # staged in records/ under the staging prefix: a leftover is ignored by git and removed later
                    staging = records_dir / f"{STAGING_PREFIX}{record.name}-{file_name}"
                    staged.append((stage_file(path, text, staging), path))
        board = render_leaderboard(records, leaderboard_path, records_dir)
        if not leaderboard_path.is_file() or leaderboard_path.read_bytes() != board.encode("utf-8"):
            staged.append((stage_file(leaderboard_path, board), leaderboard_path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    for folder in {path.parent for _, path in staged}:
        sync_folder(folder)
    return len(staged)


def verify_record(folder: Path, records_dir: Path, leaderboard_path: Path, models_dir: Path, data_dir: str,
                  device: str = "auto") -> Record:
    """Recompute an existing record's accuracy from its saved models and store the verification in its record.json
    (replacing an earlier one), then rewrite its statistics.md and leaderboard.md."""
    folder = _record_folder(folder, records_dir)
    record = load_record(folder)
    verification = verified(_record_logs(record), record.runs, models_dir, data_dir, device)
    with locked(records_dir):
        remove_leftovers(records_dir, leaderboard_path)
        ensure_replaceable(leaderboard_path)
        existing = load_records(records_dir)
        current = next((r for r in existing if r.folder.name == folder.name), None)
        if current is None or current.runs != record.runs:
            raise Refused(f"{folder} changed while it was being verified; run the command again")
        new = dataclasses.replace(current, verification=verification)
        rewrite_generated([new if r is current else r for r in existing], records_dir, leaderboard_path)
    return new


def reproduce_record(folder: Path, records_dir: Path, out: Path, runs: int, dry_run: bool,
                     data_dir: str) -> verify.Reproduction:
    """Re-run a record from its logged source (verify.reproduce) after checking it as `check` does."""
    record = load_record(_record_folder(folder, records_dir))
    try:
        return verify.reproduce(_record_logs(record), str(out), runs=runs, dry_run=dry_run, data_dir=data_dir)
    except ab.HarnessError as e:
        raise Refused(str(e)) from None


def render(records_dir: Path, leaderboard_path: Path) -> int:
    """Rewrite leaderboard.md, and any record's generated file that no longer matches its inputs."""
    with locked(records_dir):
        remove_leftovers(records_dir, leaderboard_path)
        records = load_records(records_dir)
        ensure_replaceable(leaderboard_path)
        rewrite_generated(records, records_dir, leaderboard_path)
    return len(records)


def check(records_dir: Path, leaderboard_path: Path) -> list[str]:
    """Every disagreement between records/, its generated files and leaderboard.md, one line each; every rule `add`
    and `verify` apply, dates included. Read-only."""
    folders, problems = scan_records(records_dir)
    records = []
    for folder in folders:
        try:
            records.append(load_record(folder))
        except Refused as e:
            problems += [f"record does not validate: {line}" for line in e.lines()]
    if problems:
        return problems
    problems = record_problems(records)
    if problems:
        return problems
    for record in records:
        for file_name, expected in (("record.json", record_json(record, records)),
                                    ("statistics.md", statistics_md(record, records))):
            path = record.folder / file_name
            if not path.is_file() or path.read_bytes() != expected.encode("utf-8"):
                problems.append(f"{path} does not match its logs; `python tools/leaderboard.py render` rewrites it")
    expected_board = render_leaderboard(records, leaderboard_path, records_dir).encode("utf-8")
    if (not leaderboard_path.is_file() or leaderboard_path.is_symlink()
            or leaderboard_path.read_bytes() != expected_board):
        problems.append(f"{leaderboard_path} differs from what `render` produces; run "
                        "`python tools/leaderboard.py render`")
    return problems


def build_parser() -> argparse.ArgumentParser:
    # Path flags live on every subcommand, so they go after it: `leaderboard.py check --records-dir DIR`.
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--records-dir", type=Path, default=REPO_ROOT / "records", help="default: <repo>/records")
    paths.add_argument("--leaderboard", type=Path, default=REPO_ROOT / "leaderboard.md",
                       help="default: <repo>/leaderboard.md")
    models = argparse.ArgumentParser(add_help=False)
    models.add_argument("--models", type=Path, help="folder holding the runs' <run_id>.model.pt files")
    models.add_argument("--data-dir", help="folder holding the official cifar-10-batches-py/ (default: "
                        "$AIRBENCH_SSL_DATA, else ./data)")
    models.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="where to recompute the accuracy (default: auto, a GPU if there is one)")
    parser = ab.OneLineErrorParser(prog="leaderboard.py", description=__doc__.split("\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", parents=[paths, models], allow_abbrev=False,
                           help="validate run logs (and with --models, verify them), create records/DATE_NAME/")
    p_add.add_argument("logs", nargs="+", type=Path, help=f"run logs (JSON), at least {MIN_RUNS}")
    p_add.add_argument("--name", required=True, help="required: ShortName, letters, digits, '-' and '_'")
    p_add.add_argument("--description", required=True,
                       help="required: one line for the leaderboard, what changed (printable ASCII, no '|')")
    p_add.add_argument("--date", default=today_utc().isoformat(), help="YYYY-MM-DD, default today (UTC)")
    p_verify = sub.add_parser("verify", parents=[paths, models], allow_abbrev=False,
                              help="recompute a record's accuracy from its saved models; store it in the record")
    p_verify.add_argument("record", type=Path, help="a record folder, records/DATE_NAME")
    p_reproduce = sub.add_parser("reproduce", parents=[paths], allow_abbrev=False,
                                 help="re-run a record from its logged source on this machine and compare")
    p_reproduce.add_argument("record", type=Path, help="a record folder, records/DATE_NAME")
    p_reproduce.add_argument("--runs", type=int, default=3, help="runs with fresh seeds (default 3)")
    p_reproduce.add_argument("--dry-run", action="store_true",
                             help="one tiny CPU run instead: proves the logged source runs, times nothing")
    p_reproduce.add_argument("--folder", type=Path, help="new folder for the source, logs and transcripts")
    p_reproduce.add_argument("--data-dir", default="", help="folder holding cifar-10-batches-py/ (default: "
                             "$AIRBENCH_SSL_DATA, else ./data)")
    sub.add_parser("render", parents=[paths], help="rewrite leaderboard.md (and stale generated files) from records/")
    sub.add_parser("check", parents=[paths], help="fail unless leaderboard.md == render and every record validates")
    return parser


def say(text: str, err: bool = False) -> None:
    print(one_line(text), file=sys.stderr if err else sys.stdout, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "add":
            record = add(args.logs, args.name, args.description, args.date, args.records_dir, args.leaderboard,
                         args.models, args.data_dir, args.device)
            state = f"verified on {record.verification['device']}" if record.verification else "NOT verified"
            say(f"leaderboard: added {record.folder} ({len(record.runs)} runs, mean "
                f"{format_duration(record.mean_time)} on {record.hardware}, {state}); fill in "
                f"{record.folder / 'README.md'}")
        elif args.command == "verify":
            if args.models is None:
                raise Refused("verify needs --models DIR, the folder holding the runs' <run_id>.model.pt files")
            record = verify_record(args.record, args.records_dir, args.leaderboard, args.models, args.data_dir or "",
                                   args.device)
            for entry in verification_json(record.verification, record.runs)["runs"]:  # type: ignore[arg-type]
                say(f"leaderboard: {entry['log']}: kNN at stop recomputed {entry['recomputed_knn_pct']:.2f} %, "
                    f"logged {entry['reported_knn_pct']:.2f} %; fastest epoch {entry['time_floor']['margin']:.1f}x "
                    "its FLOP floor")
            say(f"leaderboard: verified {record.folder} on {record.verification['device']}")  # type: ignore[index]
        elif args.command == "reproduce":
            out = args.folder or Path(f"reproduce_{args.record.resolve().name}_{today_utc():%Y%m%d}_"
                                      f"{datetime.datetime.now(datetime.UTC):%H%M%S}")
            result = reproduce_record(args.record, args.records_dir, out, args.runs, args.dry_run, args.data_dir)
            for command in result.commands:
                say(f"leaderboard: ran {shlex.join(command)} (in {result.folder})")
            say(f"leaderboard: {args.record}: {result.verdict}", err=not result.reproduces)
            return 0 if result.reproduces else 1
        elif args.command == "render":
            n = render(args.records_dir, args.leaderboard)
            say(f"leaderboard: rendered {args.leaderboard} ({n} records)")
        else:
            problems = check(args.records_dir, args.leaderboard)
            for problem in problems:
                say(f"leaderboard: check: {problem}", err=True)
            if problems:
                return 1
            say(f"leaderboard: ok ({len(scan_records(args.records_dir)[0])} records)")
    except Refused as e:
        for line in e.lines():
            say(f"leaderboard: refused: {line}", err=True)
        return 1
    except OSError as e:
        say(f"leaderboard: error: {e}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
