"""The registry: registration, lookup errors with suggestions, wildcard listing, summaries."""
from __future__ import annotations

import re

import pytest

from kdlab import registry
from kdlab.errors import KdlabError

# Tests register throwaway entries under this kind and remove them afterwards; its built-in entries
# (kdlab.robust's fgsm, pgd, apgd) are set aside for the test and put back after it.
KIND = "attack"


@pytest.fixture
def scratch_kind():
    """Register throwaway ``attack`` entries on an emptied kind; the built-in entries are restored afterwards."""
    registry.names("model")  # load the built-ins first, so they cannot collide with or hide our entries
    builtins = dict(registry._entries[KIND])
    registry._entries[KIND].clear()

    def add(name: str, obj=None):
        if obj is None:
            def obj():
                pass
        registry.register(KIND, name)(obj)
        return obj

    try:
        yield add
    finally:
        registry._entries[KIND].clear()
        registry._entries[KIND].update(builtins)
    assert registry.names(KIND) == sorted(builtins)


def test_register_returns_the_object_and_get_finds_it(scratch_kind):
    def fgsm():
        """Fast gradient sign."""

    assert registry.register(KIND, "fgsm")(fgsm) is fgsm  # the fixture removes it afterwards
    assert registry.get(KIND, "fgsm") is fgsm
    assert registry.names(KIND) == ["fgsm"]


def test_register_twice_raises_and_keeps_the_first(scratch_kind):
    first = scratch_kind("pgd")

    def second():
        pass

    with pytest.raises(ValueError, match="'pgd' is registered twice"):
        registry.register(KIND, "pgd")(second)
    assert registry.get(KIND, "pgd") is first


def test_builtin_names_cannot_be_registered_again():
    registry.names("method")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("method", "kd")(object)
    assert registry.get("method", "kd").__name__ == "KD"


def test_unknown_name_suggests_close_matches_and_lists_every_name(scratch_kind):
    for name in ("pgd_linf", "cw", "pgd", "fgsm"):
        scratch_kind(name)
    with pytest.raises(KdlabError) as info:
        registry.get(KIND, "pgdd")
    message = str(info.value)
    assert "unknown attack 'pgdd'" in message
    hint = re.search(r"did you mean ([^?]*)\?", message)
    assert hint is not None, message
    suggested = [s.strip() for s in hint.group(1).split(",")]
    assert "pgd" in suggested and "cw" not in suggested and "fgsm" not in suggested
    assert "known attacks: cw, fgsm, pgd, pgd_linf" in message  # the full list, sorted


def test_unknown_name_without_close_match_still_lists_every_name(scratch_kind):
    scratch_kind("fgsm")
    scratch_kind("pgd")
    with pytest.raises(KdlabError) as info:
        registry.get(KIND, "zzzzzzzz")
    assert "did you mean" not in str(info.value)
    assert "fgsm, pgd" in str(info.value)


def test_unknown_builtin_name_suggests_the_right_one():
    with pytest.raises(KdlabError, match=r"did you mean kd\b") as info:
        registry.get("method", "kdd")
    assert "scratch" in str(info.value)  # the listing names every method


def test_key_prefixes_the_error():
    with pytest.raises(KdlabError) as info:
        registry.get("model", "resnet2", key="student.model")
    assert str(info.value).startswith("student.model: unknown model 'resnet2'")


def test_unhashable_name_is_a_user_error_not_a_crash():
    with pytest.raises(KdlabError, match="unknown model"):
        registry.get("model", ["cnn1d"])


def test_names_are_sorted_and_filtered_by_wildcard(scratch_kind):
    for name in ("pgd_linf", "cw", "pgd", "fgsm", "apgd"):
        scratch_kind(name)
    assert registry.names(KIND) == ["apgd", "cw", "fgsm", "pgd", "pgd_linf"]
    assert registry.names(KIND, "*") == ["apgd", "cw", "fgsm", "pgd", "pgd_linf"]
    assert registry.names(KIND, "pgd*") == ["pgd", "pgd_linf"]
    assert registry.names(KIND, "*gd*") == ["apgd", "pgd", "pgd_linf"]
    assert registry.names(KIND, "?w") == ["cw"]
    assert registry.names(KIND, "pgd") == ["pgd"]
    assert registry.names(KIND, "PGD*") == []  # case-sensitive
    assert registry.names(KIND, "none*") == []


def test_names_lists_the_builtin_entries():
    assert {"kd", "scratch"} <= set(registry.names("method"))
    assert "cnn1d" in registry.names("model", "cnn*")
    assert registry.names("model", "cnn*") == sorted(registry.names("model", "cnn*"))


def test_summary_is_the_first_docstring_line(scratch_kind):
    def documented():
        """
        Projected gradient descent.

        Madry et al. 2018; a longer description follows.
        """

    def two_line_first_paragraph():
        """First line only
        and not this one."""

    class WithDoc:
        """A class entry.   """

    scratch_kind("documented", documented)
    scratch_kind("two_lines", two_line_first_paragraph)
    scratch_kind("undocumented")
    scratch_kind("with_doc", WithDoc)
    assert registry.summary(KIND, "documented") == "Projected gradient descent."
    assert registry.summary(KIND, "two_lines") == "First line only"
    assert registry.summary(KIND, "undocumented") == ""
    assert registry.summary(KIND, "with_doc") == "A class entry."
    assert registry.summary("method", "kd").startswith("Hinton KD")
    with pytest.raises(KdlabError, match="did you mean"):
        registry.summary(KIND, "documentd")


@pytest.mark.parametrize("bad", ["CamelCase", "UPPER", "with space", "kebab-case", "dotted.name", "",
                                 "1st", "_private", "tab\tname"])
def test_non_snake_case_names_are_rejected(bad, scratch_kind):
    with pytest.raises(ValueError, match="lower snake case"):
        registry.register(KIND, bad)
    assert bad not in registry._entries[KIND]


@pytest.mark.parametrize("good", ["pgd", "pgd_linf", "resnet8x4", "wrn_16_2", "a"])
def test_snake_case_names_are_accepted(good, scratch_kind):
    scratch_kind(good)
    assert registry.names(KIND, good) == [good]


def test_every_builtin_name_is_snake_case():
    for kind in registry.KINDS:
        for name in registry.names(kind):
            assert re.fullmatch(r"[a-z][a-z0-9_]*", name), (kind, name)


@pytest.mark.parametrize("call", [
    lambda: registry.register("widget", "x"),
    lambda: registry.get("widget", "x"),
    lambda: registry.names("widget"),
    lambda: registry.summary("widget", "x"),
    lambda: registry.get("models", "cnn1d"),  # plural is not a kind
])
def test_unknown_kind_is_rejected_with_the_kinds(call):
    with pytest.raises(KdlabError) as info:
        call()
    message = str(info.value)
    assert "unknown registry kind" in message
    for kind in registry.KINDS:
        assert kind in message
