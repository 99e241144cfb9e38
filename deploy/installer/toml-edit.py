#!/usr/bin/env python3
"""TOML reads and the one edit kuasar-install.sh makes to containerd's config.toml.

Usage: toml-edit.py get FILE KEY DEFAULT        print a value (dotted KEY), DEFAULT if absent
       toml-edit.py has-import FILE ENTRY        exit 0 when `imports` holds ENTRY
       toml-edit.py add-import FILE ENTRY        put ENTRY first in `imports`; prints `line`
                                                 when it added the imports line, else `entry`
       toml-edit.py remove-import FILE ENTRY LINE_ADDED
                                                 the reverse (LINE_ADDED: 1 = drop the line
                                                 again once it is empty)

Python's tomllib only reads, and rewriting the file from a parsed copy would lose the
admin's comments, order and formatting. So the edit is textual and confined to the top-level
`imports = [` line (inserting `"ENTRY", ` after its bracket, or a whole `imports = ["ENTRY"]`
line after `version = N`), and it is checked before anything is written: the file parsed
after the edit must equal the file parsed before, but for ENTRY in `imports`. An edit that
does not pass (an `imports` written in an unusual way) leaves the file untouched and says so.
"""
import json
import os
import re
import shutil
import sys
import tomllib

TABLE = re.compile(r"\s*\[")
IMPORTS = re.compile(r"\s*imports\s*=\s*\[")
VERSION = re.compile(r"\s*version\s*=")


class EditError(Exception):
    pass


def load(path):
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise EditError(f"{path} is not valid TOML: {e}") from None


def imports_of(doc, path):
    imports = doc.get("imports", [])
    if not isinstance(imports, list) or not all(isinstance(i, str) for i in imports):
        raise EditError(f"{path}: `imports` is not a list of strings")
    return imports


def top_level(lines):
    """Indexes of the lines before the first table header: the top-level keys."""
    for i, line in enumerate(lines):
        if TABLE.match(line):
            return range(i)
    return range(len(lines))


def imports_line(lines):
    return next((i for i in top_level(lines) if IMPORTS.match(lines[i])), None)


def add(lines, entry):
    quoted = json.dumps(entry)
    i = imports_line(lines)
    if i is not None:
        head = IMPORTS.match(lines[i]).end()
        rest = lines[i][head:]
        if rest.lstrip().startswith("]"):  # imports = []
            rest = rest.lstrip()
        else:  # before the first entry, on this line or the next
            quoted += ", " if rest.strip() else ","
        lines[i] = lines[i][:head] + quoted + rest
        return "entry"
    at = next((j + 1 for j in top_level(lines) if VERSION.match(lines[j])), 0)
    if at and not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines.insert(at, f"imports = [{quoted}]\n")
    return "line"


def remove(lines, entry, line_added):
    quoted = json.dumps(entry)
    i = imports_line(lines)
    if i is None or quoted not in lines[i]:
        raise EditError(f"{entry!r} is not on the `imports` line; remove it from `imports` by hand")
    line = lines[i]
    # The reverse of add() first, then the entry where an admin may have moved it.
    for old in (quoted + ", ", quoted + ",", ", " + quoted, quoted):
        if old in line:
            line = line.replace(old, "", 1)
            break
    if line_added and re.fullmatch(r"\s*imports\s*=\s*\[\s*\]\s*", line):
        del lines[i]
    else:
        lines[i] = line


def edit(path, entry, change, *args):
    """Applies change(lines, entry, *args), checks the result, then replaces the file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    before = load(path)
    old = imports_of(before, path)
    lines = text.splitlines(keepends=True)
    what = change(lines, entry, *args)
    new_text = "".join(lines)
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise EditError(f"{path}: the edited file would not parse ({e}); edit `imports` by hand") from None
    expected = [entry] + old if change is add else [i for i in old if i != entry]
    rest_before = {k: v for k, v in before.items() if k != "imports"}
    rest_after = {k: v for k, v in after.items() if k != "imports"}
    if imports_of(after, path) != expected or rest_after != rest_before:
        raise EditError(f"{path}: editing `imports` would change more than {entry!r}; edit it by hand")
    tmp = path + ".kuasar-new"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(new_text)
    shutil.copymode(path, tmp)
    os.replace(tmp, path)
    return what


def get(path, key, default):
    value = load(path)
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def main(argv):
    verb, args = argv[1], argv[2:]
    if verb == "get" and len(args) == 3:
        print(get(*args))
    elif verb == "has-import" and len(args) == 2:
        return 0 if args[1] in imports_of(load(args[0]), args[0]) else 1
    elif verb == "add-import" and len(args) == 2:
        print(edit(args[0], args[1], add))
    elif verb == "remove-import" and len(args) == 3:
        if args[1] in imports_of(load(args[0]), args[0]):
            edit(args[0], args[1], remove, args[2] == "1")
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except (EditError, OSError) as e:
        print(f"toml-edit.py: {e}", file=sys.stderr)
        sys.exit(1)
