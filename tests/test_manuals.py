"""The manual pages and the bash completion keep up with the code.

Every command and option of `pullbackctl` (cli.parser()) is in man/pullbackctl.1,
under that command, and offered by completion/pullbackctl for that command; every
section and key of the configuration (config.Config) is in man/pullbackd.toml.5
with its default; each page renders without a warning and uses man(7) macros only.
The README keeps up too: its configuration table has every key, its module table every
module, its copy of the interface is the interface file's declarations, and its synopsis
of pullbackctl has every command and option.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pullbackd import cli, config, reload

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "man"
PAGES = sorted(MAN.glob("*.[1-8]"))
COMPLETION = ROOT / "completion" / "pullbackctl"
#: bash-completion's loader, which provides _init_completion where it is installed.
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")

#: man(7) macros (groff_man(7), with its extensions), and the few roff requests a man
#: page may use; a page that uses anything else is refused, renderer or not.
MACROS = frozenset({
    "TH", "SH", "SS", "PP", "LP", "P", "TP", "TQ", "IP", "HP", "RS", "RE", "PD",
    "B", "I", "SM", "SB", "BI", "BR", "IB", "IR", "RB", "RI",
    "EX", "EE", "UR", "UE", "MT", "ME", "SY", "OP", "YS", "MR",
    "br", "sp", "nf", "fi", "ad", "na", "nh", "hy", "ne", "in", "ti", "nr",
})
#: The macros that alternate two fonts, joining their arguments without a space.
ALTERNATING = frozenset({"BI", "BR", "IB", "IR", "RB", "RI"})
#: What the escapes this project's pages use look like to a reader.
ESCAPES = {r"\-": "-", r"\e": "\\", r"\&": "", r"\(dq": '"', r"\(aq": "'", r"\(->": "->",
           r"\(mu": "x", r"\fB": "", r"\fI": "", r"\fR": "", r"\fP": "", r"\%": ""}
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")


# --- roff, as far as these pages need it --------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One line of a page: `macro` is "" for a text line; `text` is what a reader sees."""

    macro: str
    text: str
    tag: bool = False  # the tag of a .TP entry


def readable(roff: str) -> str:
    for escape, text in ESCAPES.items():
        roff = roff.replace(escape, text)
    return roff


def lines(page: Path) -> list[Line]:
    result: list[Line] = []
    tag = False
    for raw in page.read_text().splitlines():
        if raw.startswith((".\\\"", "'\\\"")):
            continue
        if raw.startswith((".", "'")):
            macro, _, rest = raw[1:].partition(" ")
            args = [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|\S+', rest)]
            text = readable(("" if macro in ALTERNATING else " ").join(args))
        else:
            macro, text = "", readable(raw)
        if macro == "TP":  # the next line is the entry's tag
            tag = True
            result.append(Line(macro, text))
            continue
        result.append(Line(macro, text, tag))
        tag = False
    return result


def section(page: list[Line], name: str) -> list[Line]:
    """The lines of a .SH section."""
    start = next(i for i, line in enumerate(page) if line.macro == "SH" and line.text == name)
    end = next((i for i in range(start + 1, len(page)) if page[i].macro == "SH"), len(page))
    return page[start + 1:end]


def subsections(part: list[Line]) -> dict[str, list[Line]]:
    """The lines of each .SS subsection of `part`, by its heading."""
    starts = [i for i, line in enumerate(part) if line.macro == "SS"] + [len(part)]
    return {part[i].text: part[i + 1:end] for i, end in itertools.pairwise(starts)}


def entries(part: list[Line]) -> Iterator[tuple[str, str]]:
    """Each .TP entry of `part`: its tag, and its text up to the next entry or heading."""
    for i, line in enumerate(part):
        if line.tag:
            end = next((j for j in range(i + 1, len(part))
                        if part[j].macro in ("TP", "SS", "SH")), len(part))
            yield line.text, " ".join(x.text for x in part[i + 1:end] if x.text)


def unknown_macros(page: Path) -> list[str]:
    return [f"{page.name}:{n}: {raw.split()[0]}"
            for n, raw in enumerate(page.read_text().splitlines(), 1)
            if raw.startswith((".", "'")) and not raw.startswith((".\\\"", "'\\\""))
            and raw[1:].split(" ")[0] not in MACROS]


# --- pullbackctl's parser ------------------------------------------------------------------


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the command line, by its words: () for pullbackctl itself."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for name in action.choices}


def options(parser: argparse.ArgumentParser, *, with_help: bool = True) -> set[str]:
    return {option for action in parser._actions
            if with_help or not isinstance(action, argparse._HelpAction)
            for option in action.option_strings}


COMMANDS = dict(commands(cli.parser()))
#: The commands that do something, as opposed to those that only group others.
LEAVES = {path: p for path, p in COMMANDS.items() if path and not subcommands(p)}


# --- the configuration --------------------------------------------------------------------


def toml(value: object) -> str:
    """A default value as TOML writes it (and config/pullbackd.toml has it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, tuple):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return repr(value)


def defaults() -> dict[str, dict[str, str]]:
    """Every key of every section, with its default: {"libvirt": {"uri": '"qemu:///system"'}}."""
    cfg = config.Config()
    result: dict[str, dict[str, str]] = {}
    for f in dataclasses.fields(cfg):
        part = getattr(cfg, f.name)
        result[f.name] = {k.name: toml(getattr(part, k.name)) for k in dataclasses.fields(part)}
    return result


# --- the pages ------------------------------------------------------------------------------


def test_pages_are_there_and_of_this_version() -> None:
    assert [p.name for p in PAGES] == ["pullbackctl.1", "pullbackd.8", "pullbackd.toml.5"]
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for page in PAGES:
        th = next(line for line in lines(page) if line.macro == "TH")
        assert f"pullbackd {version}" in th.text, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_renders_without_warnings(page: Path) -> None:
    """With every renderer the machine has (groff; man-db's man, as lintian runs it), and
    always against the list of man(7) macros, so that a machine with neither checks too."""
    assert unknown_macros(page) == []
    runs = []
    if shutil.which("groff"):
        runs.append(["groff", "-man", "-ww", "-z", "-Tutf8", str(page)])
    if shutil.which("man"):
        runs.append(["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)])
    env = {**os.environ, "LC_ALL": "C.UTF-8", "MANWIDTH": "80", "MANROFFSEQ": ""}
    for run in runs:
        proc = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60,
                              check=False)
        assert (proc.returncode, proc.stderr) == (0, ""), " ".join(run)


def test_macro_check_refuses_what_man_does_not_know(tmp_path: Path) -> None:
    page = tmp_path / "x.1"
    page.write_text('.TH X 1\n.\\" a comment\n.SH NAME\n.Nm x\n.B x\n')
    assert unknown_macros(page) == ["x.1:4: .Nm"]


def test_pullbackctl_page_has_every_command_and_option() -> None:
    page = lines(MAN / "pullbackctl.1")
    words = set(OPTION.findall(" ".join(line.text for line in section(page, "OPTIONS"))))
    assert options(COMMANDS[()]) <= words
    # Each command is the tag of an entry of its own, and its options are in that entry
    # (the tag, or the entries under it).
    described = section(page, "COMMANDS")

    def command(tag: str) -> tuple[str, ...] | None:
        found = [p for p in LEAVES if tag == " ".join(p) or tag.startswith(" ".join(p) + " ")]
        return max(found, key=len, default=None)

    starts = [(i, path) for i, line in enumerate(described)
              if line.tag and (path := command(line.text)) is not None]
    assert {path for _, path in starts} == set(LEAVES)
    for n, (i, path) in enumerate(starts):
        end = starts[n + 1][0] if n + 1 < len(starts) else len(described)
        text = " ".join(line.text for line in described[i:end])
        assert options(LEAVES[path], with_help=False) <= set(OPTION.findall(text)), path
        for action in LEAVES[path]._actions:
            for choice in action.choices or ():
                assert re.search(rf"\b{choice}\b", text), (path, action.dest, choice)


def test_pullbackd_page_has_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "pullbackd.service", "--help"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    page = " ".join(line.text for line in section(lines(MAN / "pullbackd.8"), "OPTIONS"))
    assert set(OPTION.findall(out)) <= set(OPTION.findall(page))
    assert {"--config", "--show-config"} <= set(OPTION.findall(out))


def test_configuration_page_has_every_key_with_its_default() -> None:
    parts = subsections(section(lines(MAN / "pullbackd.toml.5"), "SECTIONS AND KEYS"))
    assert all(re.fullmatch(r"\[\w+\]", heading) for heading in parts), list(parts)
    documented = {heading.strip("[]"): dict(tag.partition(" = ")[::2]
                                            for tag, _ in entries(part))
                  for heading, part in parts.items()}
    assert documented == defaults()


def reloading() -> set[str]:
    """The keys the configuration page lists under RELOADING, as "section.key"."""
    return {f"{tag.strip('[]')}.{key.strip()}"
            for tag, text in entries(section(lines(MAN / "pullbackd.toml.5"), "RELOADING"))
            for key in text.split(",")}


def test_configuration_page_says_which_keys_apply_at_reload() -> None:
    """The keys listed under RELOADING are those whose entries say so, and are keys."""
    page = lines(MAN / "pullbackd.toml.5")
    listed = reloading()
    marked = {f"{heading.strip('[]')}.{tag.partition(' = ')[0]}"
              for heading, part in subsections(section(page, "SECTIONS AND KEYS")).items()
              for tag, text in entries(part) if "Applies at reload." in text}
    every = {f"{s}.{k}" for s, ks in defaults().items() for k in ks}
    assert listed <= every
    assert listed == marked
    assert "roles.default" in listed and "libvirt.uri" not in listed


def test_reload_applies_the_keys_the_page_lists() -> None:
    live = {f"{s}.{k}" for s, ks in defaults().items() for k in ks if reload.is_live(f"{s}.{k}")}
    assert reloading() == live


# --- the completion -------------------------------------------------------------------------


def complete(*asked: tuple[str, ...], loader: Path | None = None,
             path: str | None = None) -> list[set[str]]:
    """What completing each command line offers, its last word being the one completed."""
    script = [f". {loader}" if loader else "", f". {COMPLETION}", """
        t() {
            COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
            COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
            _pullbackctl
            echo "${COMPREPLY[*]}"
        }"""]
    script += ["t pullbackctl " + " ".join(f"'{w}'" for w in line) for line in asked]
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", "\n".join(script)],
                          capture_output=True, text=True, env=env, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (0, "")
    return [set(out.split()) for out in proc.stdout.splitlines()]


def test_completion_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(COMPLETION)], capture_output=True, text=True,
                          check=False)
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("loader", [None, BASH_COMPLETION], ids=["alone", "bash-completion"])
def test_completion_offers_every_command_and_option(loader: Path | None) -> None:
    assert loader is None or loader.exists(), "bash-completion is missing: run scripts/setup"
    asked: list[tuple[tuple[str, ...], set[str]]] = []
    for path, parser in COMMANDS.items():
        if subcommands(parser):
            asked.append(((*path, ""), subcommands(parser)))
        if path in LEAVES or not path:
            asked.append(((*path, "-"), options(parser)))
        for action in parser._actions:
            if action.choices and action.option_strings:
                asked.append(((*path, action.option_strings[-1], ""), set(action.choices)))
    offered = complete(*(line for line, _ in asked), loader=loader)
    assert dict(zip((line for line, _ in asked), offered, strict=True)) == dict(asked)
    assert offered[0] == {"backup", "jobs", "show", "restore", "restore-domain", "verify",
                          "repo", "watch", "migrate", "checkpoints", "chain"}


def test_completion_offers_job_ids(tmp_path: Path) -> None:
    """From `pullbackctl --json jobs`, on the socket the line names; nothing, and not a
    word on the terminal, when pullbackd cannot be reached."""
    fake = tmp_path / "pullbackctl"
    reply = {"jobs": [{"id": "5d0c9a1e2f3b", "disks": [{"name": "vda"}]},
                      {"id": "77aa00bb11cc", "disks": []}], "next": None}
    fake.write_text("#!/bin/sh\n"
                    '[ "$*" = "--socket /s --json jobs" ] || exit 2\n'
                    f"cat <<'EOF'\n{json.dumps(reply, indent=2)}\nEOF\n")
    fake.chmod(0o755)
    found = complete(("--socket", "/s", "backup", "finish", ""), ("--socket", "/s", "show", "5"),
                     ("--socket", "/s", "watch", ""), ("--socket", "/s", "backup", "start", ""),
                     ("show", ""), path=f"{tmp_path}:{os.environ['PATH']}")
    assert found == [{"5d0c9a1e2f3b", "77aa00bb11cc"}, {"5d0c9a1e2f3b"},
                     {"5d0c9a1e2f3b", "77aa00bb11cc"}, set(), set()]
    real = Path(sys.executable).parent
    assert (real / "pullbackctl").exists()
    assert complete(("--socket", str(tmp_path / "none.sock"), "show", ""),
                    path=f"{real}:{os.environ['PATH']}") == [set()]


# --- the README ------------------------------------------------------------------------------

README = ROOT / "README.md"
PACKAGE = ROOT / "daemon" / "pullbackd"


def table(text: str, header: str) -> list[list[str]]:
    """The rows of the README's table whose header row is `header`, cells stripped."""
    rows = text.split(f"\n{header}\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows]


def test_readme_configuration_table_has_every_key() -> None:
    documented = {key for row in table(README.read_text(), "| key | default | meaning |")
                  for key in re.findall(r"`(\w+\.\w+)`", row[0])}
    assert documented == {f"{part}.{key}" for part, keys in defaults().items() for key in keys}


def test_readme_module_table_has_every_module() -> None:
    documented = {row[0].strip("`") for row in table(README.read_text(), "| module | what it is |")}
    shipped = {str(path.relative_to(PACKAGE)) for path in
               [*PACKAGE.glob("*.py"), *PACKAGE.glob("control/*.py"), *PACKAGE.glob("*.varlink")]
               if path.name != "__init__.py"}
    assert documented == shipped


def declarations(idl: str) -> str:
    """An interface's declarations without comments, one space between words."""
    text = " ".join(line.split("#", 1)[0] for line in idl.splitlines())
    return re.sub(r"\s+", " ", text).replace("( ", "(").replace(" )", ")").strip()


def test_readme_has_the_interface_as_it_is() -> None:
    """The README's copy of org.pullbackd.Backup is the interface file without its comments."""
    text = README.read_text()
    copy = text.split("`org.varlink.service.GetInterfaceDescription`):\n\n", 1)[1]
    copy = copy.split("\n\n", 1)[0]
    shipped = (PACKAGE / "org.pullbackd.Backup.varlink").read_text()
    assert declarations(copy) == declarations(shipped).removeprefix(
        "interface org.pullbackd.Backup ")


def test_readme_synopsis_has_every_command_and_option() -> None:
    text = README.read_text().split("\n## pullbackctl\n", 1)[1]
    synopsis = text.split("\n\n", 2)[0]
    for path, parser in LEAVES.items():
        assert " ".join(path) in synopsis, path
        for option in options(parser, with_help=False):
            if option.startswith("--"):
                assert option in synopsis, (path, option)
