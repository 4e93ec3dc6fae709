"""Condition lists returned by ``module:callable`` for ``data.conditions`` (tests of the config check)."""


def labels():
    return ["a", "b", 3]


def nothing():
    return []


def broken():
    raise RuntimeError("no labels today")


def with_dict():
    return [{"name": "a"}]
