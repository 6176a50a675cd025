"""The offline tokenizer: every chosen word is one token, free text still tokenizes, builds are deterministic."""

from guidekit.testing.tokenizer import DEFAULT_WORDS, build_clip_tokenizer, learn_bpe_merges


def test_every_word_is_one_token_and_free_text_tokenizes():
    tok = build_clip_tokenizer()
    for word in DEFAULT_WORDS:
        assert len(tok.tokenize(word)) == 1, (word, tok.tokenize(word))
    pieces = tok.tokenize("a zebra, 42!")
    assert pieces[0] == "a</w>" and len(pieces) > 3
    assert "".join(pieces).replace("</w>", "") == "azebra,42!"


def test_ties_break_the_same_way_every_time():
    # "ab" and "ba" are equally frequent: the lexicographically smaller pair merges first.
    assert learn_bpe_merges(["ab", "ba"])[0] == ("a", "b</w>")


def test_ids_depend_only_on_the_set_of_words():
    # No hash order and no input order enters the merges, so every process numbers the tokens alike.
    forward = build_clip_tokenizer(DEFAULT_WORDS).get_vocab()
    backward = build_clip_tokenizer(list(reversed(DEFAULT_WORDS))).get_vocab()
    assert forward == backward
