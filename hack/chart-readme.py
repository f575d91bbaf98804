#!/usr/bin/env python3
"""Writes deploy/helm/mesh-operator/README.md from the chart's values.yaml: each key, its default and the
comment above it (and any comment after it on its line). With --check, writes nothing and exits 1 if the
README differs (tests/e2e_helm.rs runs this, so the README cannot drift from the values)."""
import pathlib
import re
import sys

CHART = pathlib.Path(__file__).resolve().parent.parent / "deploy" / "helm" / "mesh-operator"

HEADER = """# mesh-operator Helm chart

Plans one bounded-degree, well-connected, low-churn mesh of supplementary sync links for CI build agents
and writes each agent Pod's peers into its annotations. The project's README says how to build and push
the image; `docs/operations.md` covers install, upgrade, high availability, monitoring and the alerts'
runbooks.

```sh
helm install mesh-operator deploy/helm/mesh-operator -n mesh-system --create-namespace \\
  --set image.repository=registry.example.com/ci/mesh-operator --set image.tag=0.1.0
```

`helm test mesh-operator -n mesh-system` checks that a replica is ready and exports its metrics.

## Values

Generated from `values.yaml` by `hack/chart-readme.py`; edit the comments there.

| key | default | description |
|---|---|---|
"""

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def split_comment(rest):
    """The value and the trailing comment of `rest` (a `#` outside quotes starts a comment)."""
    quote = None
    for i, c in enumerate(rest):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or rest[i - 1] == " "):
            return rest[:i].strip(), rest[i + 1:].strip()
    return rest.strip(), ""


def list_items(lines, start, depth):
    """A block list's items (`- x` lines indented deeper than `depth`) from `start`, as flow YAML."""
    items = []
    for line in lines[start:]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not stripped.startswith("- ") or len(line) - len(line.lstrip()) <= depth * 2:
            break
        item = split_comment(stripped[2:])[0]
        items.append(f"{{{item}}}" if ": " in item and not item.startswith("{") else item)
    return f"[{', '.join(items)}]" if items else ""


def rows(lines):
    """(key path, default, description) for each key. Every key needs a description: its own, a parent's,
    or one above its group of top-level keys. An undocumented value is an error, not an empty cell."""
    comment, path, described, out = [], [], [], []
    group = False  # a comment above a run of keys (no blank line between) covers them all
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        m = KEY.match(line)
        if not m:
            comment, group = [], group and bool(stripped)
            continue
        depth = len(m["indent"]) // 2
        path, described = path[:depth] + [m["key"]], described[:depth]
        value, trailing = split_comment(m["rest"])
        value = value or list_items(lines, i + 1, depth)
        text = " ".join(c for c in comment + [trailing] if c)
        group = group or (depth == 0 and bool(comment))
        described.append(bool(text) or (depth == 0 and group))
        if not any(described):
            sys.exit(f"values.yaml: {'.'.join(path)} has no comment, nor has any key above it")
        if value or text:
            out.append((".".join(path), value, text))
        comment = []
    return out


def render():
    lines = (CHART / "values.yaml").read_text().splitlines()
    table = []
    for key, value, text in rows(lines):
        cell = f"`{value}`" if value else ""
        table.append(f"| `{key}` | {cell.replace('|', '&#124;')} | {text.replace('|', '&#124;')} |")
    return HEADER + "\n".join(table) + "\n"


def main():
    readme = CHART / "README.md"
    text = render()
    if sys.argv[1:] == ["--check"]:
        if not readme.exists() or readme.read_text() != text:
            print(f"{readme} is out of date: run hack/chart-readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
