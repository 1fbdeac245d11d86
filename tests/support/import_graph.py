"""The package's import graph, read from the source with ``ast`` (nothing is imported), and the
house rules checked over it: no import cycle, no library module importing a CLI module, no import
of another module's ``_private`` name."""

from __future__ import annotations

import ast
from pathlib import Path

# Entry points: ``python -m`` modules that wire the pieces. Everything else is library.
CLI_MODULES = {"train", "eval", "generate", "convert", "plan", "sft.cli"}
CLI_PACKAGES = {"bench"}  # every module of these packages is a CLI part


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (the package directory)."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = [package, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def is_cli(name: str, package: str) -> bool:
    rel = name[len(package) + 1:] if name.startswith(package + ".") else ""
    return (rel in CLI_MODULES or name.endswith(".__main__") or rel.split(".")[0] in CLI_PACKAGES)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a package module in ``path``,
    at any depth (deferred imports inside functions count)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    out.append((sub, "", node.lineno))
                elif base in modules:
                    out.append((base, a.name, node.lineno))
    return out


def import_problems(root: Path, package: str) -> list[str]:
    """Every broken rule, one line each (empty when the house is in order)."""
    modules = module_names(root, package)
    problems, graph = [], {m: set() for m in modules}
    for name, path in modules.items():
        for target, attr, line in imports_of(name, path, modules):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target != name:
                graph[name].add(target)
            if is_cli(target, package) and not is_cli(name, package):
                problems.append(f"{where}: library module {name} imports the CLI module {target}")
            if attr.startswith("_") and not attr.startswith("__") and target != name:
                problems.append(f"{where}: {name} imports the private name {target}.{attr}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for comp in comps:  # walk the component from its first module back to itself
        members, start = set(comp), min(comp)
        path, seen, v = [start], {start}, start
        while True:
            nxt = sorted(w for w in graph[v] if w in members)
            w = next((x for x in nxt if x == start), None) or next((x for x in nxt if x not in seen), nxt[0])
            path.append(w)
            if w == start or w in seen:
                break
            seen.add(w)
            v = w
        out.append(path)
    return out
