#!/usr/bin/env python3
"""The crate's module graph, and its cycles.

An edge A -> B means code in module A names an item of module B: a `use crate::…`,
`use super::…` or `use self::…` path, or an inline `crate::…` / `super::…` path. Comments
(doc comments included: their intra-doc links are not dependencies) and top-level
`#[cfg(test)] mod … { … }` blocks are left out, unless `--tests` is given. A `mod`
declaration is not an edge, nor is a module's `pub use self::child::Item`: a parent that
declares and re-exports its children is their facade, not a user of them. A path through a
re-export (`super::Item`, `crate::Item`) is an edge to the module that defines the item.

    scripts/modgraph.py                # cycles between top-level modules (store::memory -> store;
                                       # store::claim, store::error, layer::config apart)
    scripts/modgraph.py --files        # cycles between modules as files (store::memory apart)
    scripts/modgraph.py --edges        # print every edge too
    scripts/modgraph.py --all          # list every elementary cycle
    scripts/modgraph.py --check        # exit 1 if there is a cycle, or a pure module imports
                                       # the flow, a store, observe, the layer or admin

Exits 0 when there is nothing to report.
"""

import argparse
import pathlib
import re
import sys

SRC = pathlib.Path(__file__).resolve().parent.parent / "src"

# Modules that hold pure logic: they may not depend on the request flow, the stores, the
# observation or the layer's settings. A module belongs to the longest of these paths that
# it is or lies under (`store::claim` is pure, the rest of `store` is not), else to its
# top-level module.
PURE = {"key", "fingerprint", "protocol", "record", "problem", "store::claim", "store::error"}
IMPURE = {"flow", "store", "observe", "layer", "admin"}
# The nodes of the module graph: top-level modules, and these modules inside one, each a
# node of its own. The store's vocabulary (`claim`, `error`: what the flow, `observe` and
# the stores all speak) lives in `store/` but depends on no store; the layer's settings
# (`config`) live in `layer/` but depend on no layer, and the flow and the stores read them.
UNITS = PURE | IMPURE | {"layer::config"}


def module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts == ["lib"]:
        return "crate"
    if parts[-1] == "mod":
        parts.pop()
    return "::".join(parts)


def strip(text: str, tests: bool) -> str:
    if not tests:
        # A top-level `#[cfg(test)] mod name { … }`, up to its closing brace in column 0.
        text = re.sub(
            r"^#\[cfg\(test\)\]\s*\n(?:#\[[^\n]*\]\s*\n)*mod \w+ \{.*?^\}",
            "",
            text,
            flags=re.S | re.M,
        )
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # Line comments, doc comments included; string literals holding `//` are rare enough in
    # this crate's non-test code not to matter for a dependency graph.
    return re.sub(r"//[^\n]*", "", text)


def expand(tree: str) -> list[str]:
    """`a::{b, c::{d, e}}` -> [`a::b`, `a::c::d`, `a::c::e`]."""
    # `a as b` becomes `a@b`: the item, and the name it is known by here.
    tree = re.sub(r"\s+as\s+", "@", tree)
    tree = re.sub(r"\s+", "", tree)
    out = []

    def walk(prefix: str, s: str) -> None:
        i = s.find("{")
        if i < 0:
            out.append(prefix + s)
            return
        head, body = s[:i], s[i + 1 : s.rfind("}")]
        depth, start = 0, 0
        for j, ch in enumerate(body + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                item = body[start:j]
                if item:
                    walk(prefix + head, item)
                start = j + 1

    walk("", tree)
    return out


def resolve(current: str, path: str, modules: set[str]) -> tuple[str, list[str]] | None:
    """The module a path names, and the segments after it (an item, or nothing)."""
    segs = [s.split("@")[0] for s in path.split("::") if s]
    if not segs:
        return None
    here = [] if current == "crate" else current.split("::")
    if segs[0] == "crate":
        base, segs = [], segs[1:]
    elif segs[0] == "super":
        base = here
        while segs and segs[0] == "super":
            base = base[:-1]
            segs = segs[1:]
    elif segs[0] == "self":
        base, segs = here, segs[1:]
    else:
        return None
    while segs and "::".join(base + [segs[0]]) in modules:
        base, segs = base + [segs[0]], segs[1:]
    return "::".join(base) or "crate", segs


USE = re.compile(r"\b(pub(?:\([^)]*\))?\s+)?use\s+((?:crate|super|self)\b[^;]*);")


def graph(tests: bool) -> dict[str, set[str]]:
    files = sorted(SRC.rglob("*.rs"))
    modules = {module_of(f) for f in files}
    texts = {module_of(f): strip(f.read_text(), tests) for f in files}

    # Re-exports: `pub use self::a::X` in module m makes `m::X` a name of `m::a`'s item. A
    # path through m to X depends on m::a, not on m: m is only its facade.
    reexports: dict[str, dict[str, str]] = {m: {} for m in modules}
    for me, text in texts.items():
        for m in USE.finditer(text):
            if not m.group(1):
                continue
            for p in expand(m.group(2)):
                found = resolve(me, p, modules)
                last = p.split("::")[-1]
                name = last.split("@")[-1]
                if found and found[1] and name not in ("*", "self"):
                    reexports[me][name] = found[0]

    def target(me: str, p: str) -> str | None:
        found = resolve(me, p, modules)
        if not found:
            return None
        module, rest = found
        seen = set()
        while rest and rest[0] in reexports.get(module, {}) and module not in seen:
            seen.add(module)
            module = reexports[module][rest[0]]
        return module

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for me, text in texts.items():
        paths = []
        for m in USE.finditer(text):
            facade = bool(m.group(2).startswith("self")) and bool(m.group(1))
            if facade:
                # Re-exporting one's own children is not depending on them.
                continue
            paths += expand(m.group(2))
        rest = USE.sub("", text)
        paths += re.findall(r"\b(?:crate|super)(?:::\w+)+", rest)
        for p in paths:
            t = target(me, p)
            if t and t != me and t != "crate":
                edges[me].add(t)
    return edges


def unit(module: str, units: set[str] = UNITS) -> str:
    """The longest of `units` that `module` is or lies under, else its top-level module."""
    parts = module.split("::")
    for n in range(len(parts), 0, -1):
        if "::".join(parts[:n]) in units:
            return "::".join(parts[:n])
    return parts[0]


def collapse(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    top = unit
    out: dict[str, set[str]] = {}
    for a, bs in edges.items():
        out.setdefault(top(a), set())
        for b in bs:
            if top(a) != top(b):
                out[top(a)].add(top(b))
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def elementary(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each once (from its smallest module), shortest first."""
    out: list[list[str]] = []

    def walk(start: str, v: str, path: list[str]) -> None:
        for w in sorted(edges.get(v, ())):
            if w == start:
                out.append(path + [start])
            elif w > start and w not in path:
                walk(start, w, path + [w])

    for v in sorted(edges):
        walk(v, v, [v])
    return sorted(out, key=len)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", action="store_true", help="one node per file, not per UNITS module")
    ap.add_argument("--tests", action="store_true", help="count test code too")
    ap.add_argument("--edges", action="store_true", help="print every edge")
    ap.add_argument("--all", action="store_true", help="list every elementary cycle")
    ap.add_argument("--check", action="store_true", help="exit 1 on a cycle or an impure import")
    args = ap.parse_args()

    fine = graph(args.tests)
    edges = fine if args.files else collapse(fine)
    if args.edges:
        for a in sorted(edges):
            print(f"{a} -> {', '.join(sorted(edges[a])) or '(nothing)'}")
    bad = 0
    for comp in cycles(edges):
        bad += 1
        inner = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
        print(f"cycle: {{{', '.join(comp)}}}: {'; '.join(inner)}")
    if args.all:
        every = elementary(edges)
        print(f"{len(every)} elementary cycles")
        for cycle in every:
            print("  " + " -> ".join(cycle))
    kind = lambda m: unit(m, PURE | IMPURE)
    for a, bs in sorted(collapse(fine).items()):
        if kind(a) not in PURE:
            continue
        for b in sorted(bs):
            if kind(b) in IMPURE:
                bad += 1
                print(f"impure: {a} -> {b}")
    if not bad:
        print("no cycles; pure modules import no flow, store, observe, layer or admin")
    return 1 if bad and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
