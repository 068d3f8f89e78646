"""Roles per partition: student by default, teacher where mapped."""

import pytest

from fedkd.errors import ConfigError
from fedkd.models import assign_roles


def test_default_is_student_and_map_overrides():
    assert assign_roles({}, 3) == ["student"] * 3
    assert assign_roles({"roles": {0: "teacher", "2": "teacher"}}, 3) == ["teacher", "student", "teacher"]


@pytest.mark.parametrize("roles, match", [({0: "mentor"}, "mentor"), ({7: "teacher"}, "out of range")])
def test_bad_roles_are_named(roles, match):
    with pytest.raises(ConfigError, match=match):
        assign_roles({"roles": roles}, 3)
