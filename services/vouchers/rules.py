"""Load and validate a city rules file (CONTRACTS.md §5) into ``domain`` types.

An invalid file raises :class:`RulesError`, whose message names the file, the
line and the problem, e.g. ``deploy/cities/x.yaml:14: programs[0].rate_percent:
95 is above max_rate_percent 90``; the service refuses to start with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from services.common.contracts import CITY_CODE
from services.common.units import cny_to_fen, percent_to_bp
from services.common.vouchercode import PREFIX
from services.vouchers import domain

PROGRAM_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

TOP_KEYS = {"version", "city", "name", "region", "voucher_prefix", "programs"}
# voucher_prefix is optional (CONTRACTS.md §5): the registry reserves the
# city's at admission; a file that names one must name that one.
TOP_REQUIRED = ("city", "name", "region", "programs")
PROGRAM_KEYS = {
    "id",
    "kind",
    "budget_cny",
    "rate_percent",
    "max_rate_percent",
    "face_value_cny",
    "valid_days",
    "grace_days",
    "review",
    "eligibility",
    "bonuses",
    "datacenters",
}
PROGRAM_REQUIRED = (
    "id",
    "kind",
    "budget_cny",
    "rate_percent",
    "face_value_cny",
    "valid_days",
)
BONUS_WHEN = {
    "government_run": (lambda v: isinstance(v, bool), "true or false"),
    "chip_origin": (lambda v: v in ("domestic", "imported"), "domestic or imported"),
    "hub_region": (lambda v: isinstance(v, str) and bool(v), "a region name"),
    domain.UTILISATION_BELOW: (
        lambda v: _is_number(v) and 0 < v <= 100,
        "a percentage in (0, 100]",
    ),
}
SCOPE_KEYS = {"hub_region", "government_run", "chip_origin", "exclude"}

Path_ = tuple[Any, ...]


class RulesError(ValueError):
    """A rules file that cannot be used; the message says where and why."""


class _Invalid(Exception):
    def __init__(self, path: Path_, problem: str):
        super().__init__(problem)
        self.path = path
        self.problem = problem


class _Duplicate(Exception):
    def __init__(self, line: int, path: Path_):
        super().__init__(line)
        self.line = line
        self.path = path


def _where(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _lines(node: yaml.Node, path: Path_ = (), out: dict | None = None) -> dict:
    """Path → 1-based line of every node of the document."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise _Duplicate(key.start_mark.line + 1, path + (key.value,))
                seen.add(key.value)
                out[path + (key.value,)] = key.start_mark.line + 1
                _lines(value, path + (key.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _lines(item, path + (index,), out)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _mapping(value: Any, path: Path_, what: str = "a mapping") -> dict:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be {what}, not {_show(value)}")
    return value


def _keys(
    value: dict, path: Path_, allowed: set[str], required: tuple[str, ...]
) -> None:
    for key in value:
        if key not in allowed:
            raise _Invalid(
                path + (key,),
                f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})",
            )
    for key in required:
        if key not in value:
            raise _Invalid(path, f"missing required key {key!r}")


def _show(value: Any) -> str:
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def _string(value: Any, path: Path_, pattern: re.Pattern | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(path, f"must be a non-empty string, not {_show(value)}")
    if pattern is not None and not pattern.match(value):
        raise _Invalid(path, f"{value!r} does not match {pattern.pattern}")
    return value


def _positive_int(value: Any, path: Path_) -> int:
    if not _is_int(value) or value <= 0:
        raise _Invalid(path, f"must be a whole number > 0, not {_show(value)}")
    return value


def _percent(value: Any, path: Path_) -> int:
    if not _is_number(value) or not 0 < value <= 100:
        raise _Invalid(path, f"must be a percentage in (0, 100], not {_show(value)}")
    try:
        return percent_to_bp(value)
    except ValueError as exc:
        raise _Invalid(path, str(exc)) from exc


def _rule(value: Any, path: Path_) -> domain.Rule:
    if not isinstance(value, dict) or len(value) != 1:
        raise _Invalid(
            path,
            "an eligibility rule is a mapping with exactly one key "
            "(all_of, any_of, not, or a predicate)",
        )
    ((name, argument),) = value.items()
    here = path + (name,)
    if name in ("all_of", "any_of"):
        if not isinstance(argument, list) or not argument:
            raise _Invalid(here, f"{name} takes a non-empty list of rules")
        children = tuple(_rule(child, here + (i,)) for i, child in enumerate(argument))
        return domain.AllOf(children) if name == "all_of" else domain.AnyOf(children)
    if name == "not":
        return domain.Not(_rule(argument, here))
    spec = domain.PREDICATES.get(name)
    if spec is None:
        known = ", ".join([*domain.COMBINATORS, *sorted(domain.PREDICATES)])
        raise _Invalid(here, f"unknown predicate {name!r} (known: {known})")
    if not spec.accepts(argument):
        raise _Invalid(here, f"{name} takes {spec.argument}, not {_show(argument)}")
    return domain.Predicate(name, argument)


def _bonus(value: Any, path: Path_) -> domain.Bonus:
    value = _mapping(value, path)
    _keys(value, path, {"when", "add_percent"}, ("when", "add_percent"))
    when = _mapping(value["when"], path + ("when",))
    if not when:
        raise _Invalid(path + ("when",), "must name at least one condition")
    for key, wanted in when.items():
        check = BONUS_WHEN.get(key)
        if check is None:
            raise _Invalid(
                path + ("when", key),
                f"unknown condition {key!r} (known: {', '.join(sorted(BONUS_WHEN))})",
            )
        if not check[0](wanted):
            raise _Invalid(
                path + ("when", key), f"{key} takes {check[1]}, not {_show(wanted)}"
            )
    add_bp = _percent(value["add_percent"], path + ("add_percent",))
    return domain.Bonus(tuple(sorted(when.items())), add_bp)


def _datacenters(value: Any, path: Path_) -> domain.DatacenterScope:
    if value == "any":
        return domain.ANYWHERE
    if isinstance(value, list):
        if not value:
            raise _Invalid(path, "an empty list admits no data centre; write any")
        ids = [_string(v, path + (i,)) for i, v in enumerate(value)]
        return domain.DatacenterScope(ids=frozenset(ids))
    if isinstance(value, dict):
        _keys(value, path, SCOPE_KEYS, ())
        if not value:
            raise _Invalid(path, "must name at least one restriction; or write any")
        scope: dict[str, Any] = {}
        if "hub_region" in value:
            scope["hub_region"] = _string(value["hub_region"], path + ("hub_region",))
        if "government_run" in value:
            if not isinstance(value["government_run"], bool):
                raise _Invalid(
                    path + ("government_run",),
                    f"takes true or false, not {_show(value['government_run'])}",
                )
            scope["government_run"] = value["government_run"]
        if "chip_origin" in value:
            if value["chip_origin"] not in ("domestic", "imported"):
                raise _Invalid(
                    path + ("chip_origin",),
                    f"takes domestic or imported, not {_show(value['chip_origin'])}",
                )
            scope["chip_origin"] = value["chip_origin"]
        if "exclude" in value:
            excluded = value["exclude"]
            if not isinstance(excluded, list) or not excluded:
                raise _Invalid(
                    path + ("exclude",),
                    f"takes a non-empty list of ids, not {_show(excluded)}",
                )
            scope["exclude"] = frozenset(
                _string(v, path + ("exclude", i)) for i, v in enumerate(excluded)
            )
        return domain.DatacenterScope(**scope)
    raise _Invalid(
        path,
        "must be any, a list of ids or {hub_region: …, government_run: …, "
        f"chip_origin: …, exclude: […]}}, not {_show(value)}",
    )


def _program(value: Any, path: Path_) -> domain.Program:
    value = _mapping(value, path)
    _keys(value, path, PROGRAM_KEYS, PROGRAM_REQUIRED)
    program_id = _string(value["id"], path + ("id",), PROGRAM_ID)
    kind = value["kind"]
    if kind not in domain.KINDS:
        raise _Invalid(path + ("kind",), f"must be one of {', '.join(domain.KINDS)}")
    budget = value["budget_cny"]
    if not _is_int(budget) or budget <= 0:
        raise _Invalid(
            path + ("budget_cny",),
            f"budget must be a whole number of CNY > 0, not {_show(budget)}",
        )
    rate_bp = _percent(value["rate_percent"], path + ("rate_percent",))
    max_rate_bp = rate_bp
    if "max_rate_percent" in value:
        max_rate_bp = _percent(value["max_rate_percent"], path + ("max_rate_percent",))
        if rate_bp > max_rate_bp:
            raise _Invalid(
                path + ("rate_percent",),
                f"rate_percent {value['rate_percent']} is above max_rate_percent "
                f"{value['max_rate_percent']}",
            )
    face = _mapping(
        value["face_value_cny"], path + ("face_value_cny",), "{min: …, max: …}"
    )
    _keys(face, path + ("face_value_cny",), {"min", "max"}, ("min", "max"))
    face_min = _positive_int(face["min"], path + ("face_value_cny", "min"))
    face_max = _positive_int(face["max"], path + ("face_value_cny", "max"))
    if face_min > face_max:
        raise _Invalid(
            path + ("face_value_cny",), f"min {face_min} is above max {face_max}"
        )
    if face_max > budget:
        raise _Invalid(
            path + ("face_value_cny", "max"),
            f"max {face_max} is above budget_cny {budget}",
        )
    grace_days = value.get("grace_days", domain.DEFAULT_GRACE_DAYS)
    if not _is_int(grace_days) or not 0 <= grace_days <= domain.MAX_GRACE_DAYS:
        raise _Invalid(
            path + ("grace_days",),
            f"must be a whole number of days from 0 to {domain.MAX_GRACE_DAYS}, "
            f"not {_show(grace_days)}",
        )
    review = value.get("review", "auto")
    if review not in domain.REVIEWS:
        raise _Invalid(
            path + ("review",), f"must be one of {', '.join(domain.REVIEWS)}"
        )
    eligibility = domain.ALWAYS
    if "eligibility" in value:
        eligibility = _rule(value["eligibility"], path + ("eligibility",))
    bonuses = value.get("bonuses") or []
    if not isinstance(bonuses, list):
        raise _Invalid(path + ("bonuses",), f"must be a list, not {_show(bonuses)}")
    return domain.Program(
        id=program_id,
        kind=kind,
        budget_fen=cny_to_fen(budget),
        rate_bp=rate_bp,
        max_rate_bp=max_rate_bp,
        face_min_fen=cny_to_fen(face_min),
        face_max_fen=cny_to_fen(face_max),
        valid_days=_positive_int(value["valid_days"], path + ("valid_days",)),
        grace_days=grace_days,
        review=review,
        eligibility=eligibility,
        bonuses=tuple(_bonus(b, path + ("bonuses", i)) for i, b in enumerate(bonuses)),
        datacenters=_datacenters(
            value.get("datacenters", "any"), path + ("datacenters",)
        ),
    )


def _city(data: Any, sha256: str, source: str) -> domain.CityRules:
    data = _mapping(data, ())
    _keys(data, (), TOP_KEYS, TOP_REQUIRED)
    programs = data["programs"]
    if not isinstance(programs, list) or not programs:
        raise _Invalid(("programs",), "must be a non-empty list of programs")
    parsed = []
    for index, item in enumerate(programs):
        program = _program(item, ("programs", index))
        if any(p.id == program.id for p in parsed):
            raise _Invalid(
                ("programs", index, "id"), f"duplicate program id {program.id!r}"
            )
        parsed.append(program)
    version = data.get("version")
    if version is None:
        version = sha256[:12]
    elif not isinstance(version, str | int) or isinstance(version, bool):
        raise _Invalid(("version",), f"must be a string, not {_show(version)}")
    return domain.CityRules(
        city=_string(data["city"], ("city",), CITY_CODE),
        name=_string(data["name"], ("name",)),
        region=_string(data["region"], ("region",)),
        voucher_prefix=(
            _string(data["voucher_prefix"], ("voucher_prefix",), PREFIX)
            if "voucher_prefix" in data
            else None
        ),
        programs=tuple(parsed),
        version=str(version),
        sha256=sha256,
        source=source,
    )


def parse_rules(text: bytes, source: str = "<rules>") -> domain.CityRules:
    """Validate the bytes of a rules file; ``source`` names it in errors."""
    sha256 = hashlib.sha256(text).hexdigest()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RulesError(f"{source}{line}: not valid YAML: {problem}") from exc
    if node is None:
        raise RulesError(f"{source}: the rules file is empty")
    try:
        lines = _lines(node)
    except _Duplicate as dup:
        raise RulesError(
            f"{source}:{dup.line}: {_where(dup.path)}: duplicate key {dup.path[-1]!r}"
        ) from None
    try:
        return _city(data, sha256, source)
    except _Invalid as invalid:
        path = invalid.path
        while path not in lines:
            path = path[:-1]
        where = _where(invalid.path)
        prefix = f"{source}:{lines[path]}: "
        raise RulesError(
            prefix + (f"{where}: " if where else "") + invalid.problem
        ) from None


def load_rules(
    path: str | Path, city: str | None = None, voucher_prefix: str | None = None
) -> domain.CityRules:
    """Read and validate a rules file; with ``city``, it must be that city's.

    ``voucher_prefix`` is the prefix the registry reserved for the city at
    admission (``VOUCHER_PREFIX``): the rules then carry it, and a file that
    names another is refused.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise RulesError(
            f"{path}: cannot read rules file: {exc.strerror or exc}"
        ) from exc
    rules = parse_rules(text, str(path))
    if city is not None and rules.city != city:
        raise RulesError(
            f"{path}: city is {rules.city!r} but this instance is {city!r}"
        )
    if voucher_prefix is None:
        return rules
    if not PREFIX.match(voucher_prefix):
        raise RulesError(
            f"VOUCHER_PREFIX {voucher_prefix!r} is not a voucher prefix "
            "(2-4 capital letters A-Z)"
        )
    if rules.voucher_prefix not in (None, voucher_prefix):
        raise RulesError(
            f"{path}: voucher_prefix is {rules.voucher_prefix!r} but the registry "
            f"reserved {voucher_prefix!r} for {rules.city} at admission "
            f"(VOUCHER_PREFIX): use {voucher_prefix!r} or leave voucher_prefix out"
        )
    return dataclasses.replace(rules, voucher_prefix=voucher_prefix)


def instance_rules(
    path: str | Path, city: str, voucher_prefix: str | None
) -> domain.CityRules:
    """The rules a city's service runs on: its file, with the voucher prefix
    the registry reserved for it (``VOUCHER_PREFIX``, else the file's own);
    RulesError when they differ or neither names one."""
    rules = load_rules(path, city, voucher_prefix or None)
    if rules.voucher_prefix is None:
        raise RulesError(
            f"{path}: no voucher prefix for {city}: set VOUCHER_PREFIX to the "
            "prefix the registry reserved at admission (the admission answer's "
            "city.voucher_prefix, or GET /api/v1/cities/<city>), or voucher_prefix "
            "in the rules file"
        )
    return rules


def check_files(paths: list[str], out=None, err=None) -> int:
    """``python -m services.vouchers.rules check FILE…``: validate, start nothing.

    Prints ``ok: FILE (N programs, rules version V)`` per valid file, the
    message of the first problem per invalid one; 0 when all are valid.
    """
    import sys

    out = out or sys.stdout
    err = err or sys.stderr
    status = 0
    for path in paths:
        try:
            rules = load_rules(path)
        except RulesError as exc:
            print(exc, file=err)
            status = 1
            continue
        count = len(rules.programs)
        print(
            f"ok: {path} ({count} programs, rules version {rules.version})",
            file=out,
        )
    return status


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m services.vouchers.rules",
        description="Validate city rules files without starting anything.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate rules files")
    check.add_argument("files", nargs="+", metavar="FILE")
    args = parser.parse_args(argv)
    return check_files(args.files)


if __name__ == "__main__":
    raise SystemExit(main())
