"""Who reaches what: a bound caller only its own, an unbound caller everything."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from convcore import OPERATOR, Caller

names = st.one_of(st.none(), st.sampled_from(["alice", "bob", "", "Alice", "alice "]))


@given(user=names, sys=names, owner_user=names, owner_sys=names)
def test_a_bound_caller_reaches_only_records_carrying_its_user(
    user: str | None, sys: str | None, owner_user: str | None, owner_sys: str | None
) -> None:
    record = {"user_name": owner_user, "sys_code": owner_sys}
    bound = Caller(user, sys, bound=True)
    reached = bound.reaches(record)
    if reached:
        assert owner_user is not None and owner_user == user
        assert sys is None or owner_sys == sys
    if owner_user is None:
        assert not reached  # ownerless: operators only
    assert Caller(user, sys).reaches(record) and OPERATOR.reaches(record)


@given(user=names, sys=names, given_user=names, given_sys=names)
def test_a_created_record_carries_the_callers_owner(
    user: str | None, sys: str | None, given_user: str | None, given_sys: str | None
) -> None:
    stamped = Caller(user, sys, bound=True).stamp({"user_name": given_user, "sys_code": given_sys, "x": 1})
    assert stamped["x"] == 1
    assert stamped["user_name"] == (user if user is not None else given_user)
    assert stamped["sys_code"] == (sys if sys is not None else given_sys)
    if user is not None:
        assert Caller(user, sys, bound=True).reaches(stamped)
