#!/usr/bin/env python3
"""Fails when a source file of a crate imports, directly or through others, a file that imports
it back (an import circle). Every arrow of the house points down: HTTP -> operations ->
database, Docker and route table; this keeps it so.

    scripts/import-circles.py [CRATE_SRC_DIR ...]     (default: every crate of the workspace)

A file's imports are the `crate::`, `super::` and `self::` paths it names (outside comments,
strings and its `#[cfg(test)] mod tests`), and, in a `mod.rs` or `lib.rs`, the `use child::...`
of its own children. A path names the deepest module file it reaches. Test files (`*_tests.rs`)
and `bin/` are left out. Prints each circle's files, exit status 1 when there is one.
"""

import os
import re
import sys

CRATES = ["control-api/src", "ngx-module/src", "shared/src", "client/src"]

PATH = re.compile(r"\b((?:crate|super|self)(?:::[A-Za-z_]\w*)*)(::\{([^;]*?)\})?")
CHILD_USE = re.compile(r"(?m)^\s*(?:pub(?:\([a-z]+\))?\s+)?use\s+([A-Za-z_]\w*)::")


def module_of(rel):
    parts = rel[:-3].split("/")
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def is_parent(rel):
    return os.path.basename(rel) in ("mod.rs", "lib.rs", "main.rs")


def strip(src):
    src = re.sub(r"(?s)#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", src)
    src = re.sub(r"(?m)//.*$", "", src)
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', src)


def read_crate(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if name.endswith(".rs") and not name.endswith("_tests.rs") and not rel.startswith("bin/"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    files[rel] = strip(f.read())
    return files


def imports(files):
    by_module = {module_of(rel): rel for rel in files}

    def target(rel, segments):
        if segments[0] == "crate":
            base, rest = [], segments[1:]
        else:
            base, rest = list(module_of(rel)), segments
            while rest and rest[0] == "super":
                base, rest = base[:-1], rest[1:]
            if rest and rest[0] == "self":
                rest = rest[1:]
        found = None
        for n in range(len(rest) + 1):
            found = by_module.get(tuple(base + rest[:n]), found)
        return found

    edges = {rel: set() for rel in files}
    for rel, src in files.items():
        for m in PATH.finditer(src):
            if "::" not in m.group(1) and m.group(2) is None:
                continue  # `pub(crate)`, `&self`
            base = m.group(1).split("::")
            paths = [base]
            for item in re.split(r",\s*", m.group(3) or ""):
                item = item.strip().split(" as ")[0]
                if item and item != "self":
                    paths.append(base + item.split("::"))
            for p in paths:
                t = target(rel, p)
                if t and t != rel:
                    edges[rel].add(t)
        if is_parent(rel):
            for m in CHILD_USE.finditer(src):
                t = by_module.get(module_of(rel) + (m.group(1),))
                if t and t != rel:
                    edges[rel].add(t)
    return edges


def circles(edges):
    """Strongly connected components of more than one file (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    roots = sys.argv[1:] or CRATES
    bad = 0
    for root in roots:
        files = read_crate(root)
        edges = imports(files)
        found = circles(edges)
        print(f"{root}: {len(files)} files, {len(found)} import circles")
        for comp in found:
            bad += 1
            back = [f"{a} -> {b}" for a in comp for b in sorted(edges[a]) if b in comp]
            print("  circle: " + ", ".join(comp))
            for arrow in back:
                print("    " + arrow)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
