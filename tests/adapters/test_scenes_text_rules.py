"""The scenes hold names and required text to the same rules as a chat
request: a name is non-blank and free of control characters and line
breaks, and text that must not be blank holds something besides white
space (any of the characters ``str.isspace`` knows), so a flow the
registry takes is one a turn can run."""

from __future__ import annotations

import pytest

from convcore.schema import has_text
from tests.adapters.scenes_support import CHAT, assert_envelope_error, client, harness

pytestmark = pytest.mark.anyio

APPS = "/api/v2/serve/apps"
FLOWS = "/api/v2/serve/awel/flows"

# White space a byte-range rule ("above \x20") took for text: no-break and ideographic spaces.
UNICODE_BLANKS = ["\u00a0", "\u3000", " \u2003\u00a0"]


@pytest.mark.parametrize("text", ["", " ", "\t\n", *UNICODE_BLANKS])
def test_blank_is_what_strip_removes(text: str) -> None:
    assert not has_text(text) and not text.strip()


@pytest.mark.parametrize("text", ["a", " a ", "\x01", "\u200b"])
def test_text_is_anything_else(text: str) -> None:
    assert has_text(text) and text.strip()


@pytest.mark.parametrize("blank", UNICODE_BLANKS)
async def test_a_flow_step_whose_param_is_white_space_is_refused_as_a_turn_would_be(blank: str) -> None:
    h = harness()
    async with client(h.app) as c:
        flow = await c.post(FLOWS, json={"name": "f", "flow_data": [{"scene": "chat_app", "param": blank}]})
        assert_envelope_error(flow, 400)
        turn = await c.post(CHAT, json={"messages": "hi", "chat_mode": "chat_app", "chat_param": blank})
        assert_envelope_error(turn, 400)
        listed = await c.get(FLOWS)
        assert listed.json()["data"]["items"] == []  # nothing stored


@pytest.mark.parametrize("code", ["a\x7fb", "a\x85b", "line\u2028break", "\u3000"])
async def test_an_app_code_with_a_control_character_or_only_white_space_is_refused(code: str) -> None:
    h = harness()
    async with client(h.app) as c:
        bad = assert_envelope_error(await c.post(APPS, json={"app_code": code, "app_name": "A"}), 400)
        assert "app_code" in bad["err_msg"]
        assert (await c.get(APPS)).json()["data"]["app_list"] == []  # nothing stored
