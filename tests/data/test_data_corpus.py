"""The per-domain train/validation split: disjoint, complete, deterministic, clear errors."""

import pytest
from data_sample import make_documents

from moge.data.corpus import Document, split_documents, text_sha256


def _docs():
    return make_documents("verse", 12) + make_documents("prose", 20) + make_documents("code_docs", 5)


def test_split_is_disjoint_complete_and_per_domain():
    docs = _docs()
    split = split_documents(docs, val_fraction=0.2, seed=0)
    assert list(split) == ["verse", "prose", "code_docs"]
    for domain, parts in split.items():
        train = {d.name for d in parts["train"]}
        val = {d.name for d in parts["val"]}
        assert train and val and not train & val
        assert train | val == {d.name for d in docs if d.domain == domain}
        assert all(d.domain == domain for d in parts["train"] + parts["val"])
        chars = sum(len(d.text) for d in parts["val"]) / sum(len(d.text) for d in docs if d.domain == domain)
        assert 0.2 <= chars <= 0.2 * 1.5 + 1e-9 or len(parts["val"]) == 1


def test_split_is_deterministic_and_order_independent():
    docs = _docs()
    a = split_documents(docs, 0.2, seed=3)
    b = split_documents(list(reversed(docs)), 0.2, seed=3)
    for domain in a:
        assert {d.name for d in a[domain]["val"]} == {d.name for d in b[domain]["val"]}
    # other seeds pick other documents
    picks = {frozenset(d.name for d in split_documents(docs, 0.2, seed=s)["prose"]["val"]) for s in range(6)}
    assert len(picks) > 1


def test_split_of_one_domain_ignores_the_others():
    docs = _docs()
    alone = split_documents([d for d in docs if d.domain == "prose"], 0.2, seed=1)
    together = split_documents(docs, 0.2, seed=1)
    assert alone["prose"] == together["prose"]


def test_every_domain_keeps_training_data():
    docs = make_documents("prose", 2)
    split = split_documents(docs, val_fraction=0.99)
    assert len(split["prose"]["train"]) == 1 and len(split["prose"]["val"]) == 1


def test_text_hash_changes_with_text():
    docs = make_documents("prose", 3)
    changed = docs[:2] + [Document("prose", docs[2].name, docs[2].text + " ")]
    assert text_sha256(docs) == text_sha256(list(docs)) != text_sha256(changed)


@pytest.mark.parametrize("docs, fraction, message", [
    (make_documents("prose", 1), 0.1, r"domain 'prose' has 1 document: a train/validation split needs at least 2"),
    (make_documents("prose", 3) + make_documents("prose", 1), 0.1, r"duplicate document names \['prose_00'\]"),
    (make_documents("prose", 3), 0.0, r"val_fraction=0.0 is invalid"),
    (make_documents("prose", 3), 1.0, r"val_fraction=1.0 is invalid"),
    ([Document("Bad Name", "a", "x"), Document("Bad Name", "b", "y")], 0.1, r"domain name 'Bad Name' is invalid"),
    ([Document("prose", "a", ""), Document("prose", "b", "y")], 0.1, r"document prose/a is empty"),
    ([], 0.1, r"no documents"),
])
def test_bad_inputs(docs, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_documents(docs, fraction)
