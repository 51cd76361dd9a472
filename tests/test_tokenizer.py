"""gptfast.tokenizer: the ids and text of transformers' GPT-2 tokenizer; streams never split a character."""

import random
import shutil

import pytest
import torch

from gptfast.tokenizer import has_tokenizer_files, load_tokenizer

from checkpoints import train_tokenizer

TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "The quick brown fox.\n\n\tdef f(x):\n        return x  # indented\n",
    "Emoji 🙂😀 and new ones 🦄🧪, skin tone 👍🏽, family 👨‍👩‍👧‍👦, flag 🇯🇵",
    "東京は日本の首都です。未知の漢字：鬱龘。한국어 텍스트",
    "accents: Café naïve Ærøskøbing; symbols: Ω≈ç√∫ €100 ½",
    "before<|endoftext|>after",
    "",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One trained tokenizer, saved once per format, each in a folder of its own."""
    root = tmp_path_factory.mktemp("tok")
    train_tokenizer(root / "both", vocab_size=600)
    (root / "json").mkdir()
    shutil.copy(root / "both" / "tokenizer.json", root / "json")
    (root / "bpe").mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(root / "both" / name, root / "bpe")
    return {"tokenizer.json": root / "json", "vocab+merges": root / "bpe"}


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab+merges"])
def pair(request, folders):
    """(gptfast tokenizer, transformers tokenizer) read from the same files."""
    import transformers

    folder = folders[request.param]
    return load_tokenizer(folder), transformers.GPT2TokenizerFast.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_match_transformers(pair, text):
    tok, hf = pair
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.decode(ids) == hf.decode(ids, clean_up_tokenization_spaces=False) == text


def test_both_formats_agree(folders):
    a, b = (load_tokenizer(f) for f in folders.values())
    assert a.vocab_size == b.vocab_size
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)


def test_endoftext_is_one_special_token(pair):
    tok, hf = pair
    assert tok.eos_token_id is not None
    assert tok.eos_token_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id in tok.encode("a<|endoftext|>b")


def test_decode_accepts_a_tensor(pair):
    tok, _ = pair
    ids = tok.encode(TEXTS[3])
    assert tok.decode(torch.tensor(ids)) == TEXTS[3]


def test_decode_of_a_split_character_is_lossy_like_transformers(pair):
    tok, hf = pair
    ids = tok.encode("🦄")
    assert len(ids) > 1, "the emoji should span several tokens for this test to mean anything"
    assert tok.decode(ids[:1]) == hf.decode(ids[:1]) and "\ufffd" in tok.decode(ids[:1])


def _stream(tok, ids):
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_stream_emits_exactly_the_text(pair, text):
    tok, _ = pair
    pieces, rest = _stream(tok, tok.encode(text))
    assert "".join(pieces) + rest == text
    assert rest == ""  # valid text leaves nothing held back
    assert not any("\ufffd" in p for p in pieces)


def test_stream_holds_back_split_characters(pair):
    tok, _ = pair
    text = "a🦄b鬱"
    ids = tok.encode(text)
    pieces, _ = _stream(tok, ids)
    assert "" in pieces, f"no token of {ids} split a character: the test exercises nothing"
    assert "".join(pieces) == text
    # Each piece is emitted as soon as its last byte has arrived.
    emitted = ""
    for i, piece in enumerate(pieces):
        emitted += piece
        assert emitted == tok.decode(ids[: i + 1]).rstrip("\ufffd")


def test_stream_of_random_ids_matches_decode(pair):
    """Random ids include lone continuation bytes and truncated sequences: still exact."""
    tok, _ = pair
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        pieces, rest = _stream(tok, ids)
        assert "".join(pieces) + rest == tok.decode(ids), ids
        assert not any(p.endswith("\ufffd") for p in pieces), ids


def test_has_tokenizer_files(folders, tmp_path):
    assert has_tokenizer_files(folders["tokenizer.json"]) and has_tokenizer_files(folders["vocab+merges"])
    shutil.copy(folders["vocab+merges"] / "vocab.json", tmp_path)
    assert not has_tokenizer_files(tmp_path)  # vocab.json alone is not a tokenizer


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer in .*found \['vocab.json'\]"):
        load_tokenizer(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not read tokenizer file"):
        load_tokenizer(tmp_path)
