"""Caption cleaning, tokenizer loading and the span → token positive map (text.py)."""
import pytest
import torch

from minidiffprompt.data.text import clean_caption, load_tokenizer, positive_map

WORDS = ["the", "small", "red", "circle", "left", "of", "man", "in", "shirt", "on", "bottom", "skate", "##board",
         "##er", "##s", "cafe", "."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    return load_tokenizer(path)


def test_clean_caption_matches_pre_caption():
    assert clean_caption('The Man (left)!  on  the "bench".') == "the man left on the bench"
    assert clean_caption("a*b#c:d;e~f") == "a b c d e f"
    assert clean_caption("man's hat, left") == "man's hat, left"  # apostrophes and commas are kept
    assert clean_caption(" ".join(str(i) for i in range(40))) == " ".join(str(i) for i in range(30))


def test_tokenizer_from_vocab_file(tok):
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 2, 3)
    enc = tok("The small red circles")
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["[CLS]", "the", "small", "red", "circle", "##s", "[SEP]"]


def test_tokenizer_errors_name_the_problem(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("hello\nworld\n")
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        load_tokenizer(bad)
    with pytest.raises(FileNotFoundError, match="not found locally"):
        load_tokenizer(str(tmp_path / "no-such-model"))


def _reference_map(tok, caption, spans, max_len):
    """Naive: a token is positive when its character range overlaps a span (equal to `positive_map` on clean spans)."""
    enc = tok(caption, return_offsets_mapping=True)
    row = torch.zeros(max_len)
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and any(a < e and s < b for s, e in spans) and i < max_len:
            row[i] = 1
    return row


@pytest.mark.parametrize("caption,spans,expected", [
    ("man in red shirt on the left", [[0, 3]], {1}),                # [CLS] man ...: token 1
    ("bottom left skateboarder", [[12, 24]], {3, 4, 5}),             # [CLS] bottom left skate ##board ##er
    ("the small red circle left of the circles", [[4, 20]], {2, 3, 4}),
    ("the small red circle", [[3, 20]], {2, 3, 4}),                  # begins on a space: retried at beg+1
    ("the small red circle ", [[4, 21]], {2, 3, 4}),                 # ends after a space: retried at end-2
    ("the small red circle", [[0, 3], [14, 20]], {1, 4}),            # several spans are OR-ed
    ("the   circle", [[3, 6]], set()),                               # only spaces: skipped
    ("the café", [[4, 8]], {2}),                                     # accents stripped, offsets in the raw string
])
def test_positive_map_hand_cases(tok, caption, spans, expected):
    row = positive_map(tok, caption, spans, 16)
    assert set(torch.nonzero(row).flatten().tolist()) == expected
    assert row.shape == (16,) and set(row.unique().tolist()) <= {0.0, 1.0}


def test_positive_map_matches_overlap_reference_and_truncates(tok):
    caption = "the small red circle left of the man in red shirt on the bottom"
    for spans in ([[4, 20]], [[33, 36]], [[0, len(caption)]], [[21, 28], [53, 63]]):
        assert torch.equal(positive_map(tok, caption, spans, 32), _reference_map(tok, caption, spans, 32))
    row = positive_map(tok, caption, [[0, len(caption)]], 5)  # tokens beyond max_len are dropped
    assert row.tolist() == [0, 1, 1, 1, 1]
