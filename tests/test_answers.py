import pytest

from ragkit.answers import answer_tokens, exact_match, f1, has_answer, normalize_answer


def test_tokens_follow_drqa_simple_tokenizer():
    # runs of letters/digits/marks, or one other non-space character each
    assert answer_tokens("U.S. Route 66, (1926)!") == ["u", ".", "s", ".", "route", "66", ",", "(", "1926", ")", "!"]


@pytest.mark.parametrize(
    "answers, text, expected",
    [
        (["art"], "a party in Paris", False),  # token match, not substring
        (["art"], "modern art museum", True),
        (["Eiffel Tower"], "the eiffel   tower stands", True),  # uncased, white space irrelevant
        (["Eiffel Tower"], "the tower eiffel", False),  # order matters
        (["U.S."], "born in the U . S . in 1950", True),
        (["café"], "a cafe\u0301 opened", True),  # NFD: precomposed answer, decomposed text
        (["1926"], "in 19261 the road", False),
        ([""], "anything at all", False),  # an empty answer matches nothing
        ([], "anything", False),
        (["nope", "road"], "the road", True),  # any answer
    ],
)
def test_has_answer_string_mode(answers, text, expected):
    assert has_answer(answers, text) is expected


def test_has_answer_regex_mode():
    assert has_answer([r"\d{4}"], "founded in 1926", match_type="regex")
    assert has_answer([r"EIFFEL"], "the eiffel tower", match_type="regex")  # case-insensitive
    assert not has_answer([r"(unclosed"], "(unclosed", match_type="regex")  # invalid pattern: no match
    with pytest.raises(ValueError):
        has_answer(["x"], "x", match_type="substring")


def test_squad_normalisation_and_metrics():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Eiffel Tower", ["Eiffel Tower", "tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel Tower"]) == 0.0
    # precision 1/2, recall 1/3 -> 2 * (1/2 * 1/3) / (1/2 + 1/3) = 0.4
    assert f1("paris france", ["paris city center"]) == pytest.approx(0.4)
    assert f1("paris", ["london", "paris"]) == 1.0
    assert f1("", ["paris"]) == 0.0
