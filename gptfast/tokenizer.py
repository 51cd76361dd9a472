"""GPT-2 byte-level BPE tokenizer: load one from a checkpoint folder, encode, decode, stream.

The `tokenizers` library does the work; it is imported only when a tokenizer is loaded, so
importing gptfast stays light. Two folder layouts are read, the same two Hugging Face reads:

- `tokenizer.json` (the `tokenizers` format, preferred when present);
- `vocab.json` + `merges.txt` (GPT-2's original files), rebuilt the way transformers'
  `GPT2Tokenizer` builds them: byte-level BPE, no prefix space, byte-level decoder, and
  `<|endoftext|>` as a special token when the vocabulary has it.
"""

from __future__ import annotations

from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def has_tokenizer_files(folder: str | Path) -> bool:
    """Whether `folder` holds `tokenizer.json` or both `vocab.json` and `merges.txt`."""
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or (
        (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    )


class Tokenizer:
    """A loaded byte-level BPE tokenizer (wraps a `tokenizers.Tokenizer`).

    Attributes
    ----------
    eos_token_id : int or None
        The id of ``"<|endoftext|>"``, or None when the vocabulary lacks it.
    vocab_size : int
        Number of ids, added tokens included.
    """

    def __init__(self, backend, source: str):
        self._backend = backend
        self.source = source
        self.eos_token_id: int | None = backend.token_to_id(EOS_TOKEN)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (like transformers' ``tokenizer.encode(text)``).

        Examples
        --------
        >>> tok.decode(tok.encode("Hello world"))
        'Hello world'
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self._backend.encode(text).ids

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (any iterable of ints, e.g. a 1-D tensor).

        Special tokens are kept, and byte sequences that are not valid UTF-8 become U+FFFD,
        as in transformers' ``tokenizer.decode(ids)``.
        """
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        """A fresh `StreamDecoder` over this tokenizer."""
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source}, vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"


class StreamDecoder:
    """Turns token ids arriving one at a time into text, emitting only completed characters.

    A byte-level BPE token can end in the middle of a multi-byte UTF-8 character (an emoji
    is often split over two or three tokens). Decoding such a prefix gives U+FFFD, so the
    text of the pending tokens is held back until it no longer ends in U+FFFD. Pieces are
    decoded in a short window that starts at the last character boundary (the approach of
    vLLM's incremental detokenizer), so each `push` costs O(window), not O(sequence).

    The concatenation of everything `push` and `flush` return equals
    ``tokenizer.decode(all_ids)``.

    Examples
    --------
    >>> stream = tok.stream_decoder()
    >>> text = "".join(stream.push(i) for i in ids) + stream.flush()
    >>> text == tok.decode(ids)
    True
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        # NOTE: _ids[_prefix:_read] decodes to text that ends on a character boundary and
        # was already emitted; it is decoded again only as context for the next piece.
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ('' while a character is split)."""
        self._ids.append(int(token_id))
        done = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Return whatever is still held back (invalid or incomplete bytes become U+FFFD)."""
        done = self._tokenizer.decode(self._ids[self._prefix : self._read])
        text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer stored in a checkpoint folder.

    Parameters
    ----------
    folder : str or Path
        A folder holding ``tokenizer.json``, or ``vocab.json`` and ``merges.txt``.

    Returns
    -------
    Tokenizer

    Examples
    --------
    >>> tok = load_tokenizer("checkpoints/gpt2")
    >>> tok.encode("Hello world")
    [15496, 995]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist or is not a folder")
    if not has_tokenizer_files(folder):
        raise FileNotFoundError(
            f"no tokenizer in {str(folder)!r}: expected 'tokenizer.json', or 'vocab.json' and "
            f"'merges.txt'; found {sorted(p.name for p in folder.iterdir())}"
        )
    import tokenizers

    if (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad files
            raise ValueError(f"could not read tokenizer file {str(path)!r}: {e}") from e
        return Tokenizer(backend, str(path))

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    try:
        bpe = tokenizers.models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise ValueError(f"could not read tokenizer files {str(vocab)!r} and {str(merges)!r}: {e}") from e
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    if backend.token_to_id(EOS_TOKEN) is not None:
        # Matched whole in the input, never split into BPE pieces (transformers does the same).
        backend.add_special_tokens([EOS_TOKEN])
    return Tokenizer(backend, f"{vocab} + {merges.name}")
