"""Answer extraction, matching and the answer reward (fallback and BERTScore paths, offline)."""
import os
import warnings

import pytest
import torch

import mrpo.rewards.answer as answer_mod
from mrpo.rewards.answer import AnswerScorer, answers_match, extract_answer, normalize_answer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_extract_answer_last_block():
    assert extract_answer("<answer>a</answer> text <answer>\n Left lung \n</answer>") == "Left lung"
    assert extract_answer("<answer>  </answer>") is None
    assert extract_answer("<answer>unterminated") is None
    assert extract_answer("no answer") is None


def test_normalize_answer():
    assert normalize_answer("  The Left-Lung. ") == "left lung"
    assert normalize_answer("An MRI, T2 weighted!") == "mri t2 weighted"
    assert normalize_answer("2.5 cm") == "2.5 cm"
    assert normalize_answer("ＣＴ") == "ct"  # NFKC full-width


@pytest.mark.parametrize("pred,gold", [
    ("yes", "Yes"), ("Yes, there is a mass.", "yes"), ("no.", "No"), ("True", "yes"),
    ("2", "two"), ("two", "2.0"), ("4/2", "2"), ("1,000", "1000"), ("twenty-one", "21"),
    ("one hundred and five", "105"), ("the left lung", "Left lung."),
])
def test_answers_match_true(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("no", "yes"), ("Yes", "no"), ("there is a mass", "yes"), ("3", "2"), ("3 lesions", "3"),
    ("right lung", "left lung"), ("", "yes"), ("left lung", ""), ("three", "30"),
])
def test_answers_match_false(pred, gold):
    assert not answers_match(pred, gold)


def test_answers_match_symbolic():
    if answer_mod._mv_verify is None:
        pytest.skip("math-verify not installed")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("x^2+2x+1", "(x+1)^2")
    assert not answers_match("x^2+1", "(x+1)^2")


def test_fallback_score_hand_computed(monkeypatch):
    monkeypatch.setattr(answer_mod, "_FALLBACK_WARNED", False)
    with pytest.warns(UserWarning, match="fallback"):
        scorer = AnswerScorer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnswerScorer()  # warned once only
    # pred "left lung" vs gold "the right lung": ROUGE-1 (rouge-score keeps "the") P=1/2, R=1/3 -> F=0.4;
    # BLEU-1 on normalised tokens: p1 = 1/2 ("lung"), no brevity penalty (2 >= 2) -> 0.5
    assert scorer.similarity("left lung", "the right lung") == pytest.approx((0.4, 0.5))
    assert scorer.score("left lung", "the right lung") == pytest.approx(0.5 * 0.4 + 0.5 * 0.5)
    # short hypothesis: BLEU-1 = BP * p1 = exp(1 - 3/1) * 1
    assert scorer.similarity("lung", "left lower lung")[1] == pytest.approx(torch.tensor(-2.0).exp().item())
    assert scorer.score(None, "x") == 0.0
    assert scorer.score("Left lung", "left lung") == 1.0
    assert scorer.score("No", "yes") == 0.0                     # closed question: no partial credit
    assert scorer.score("a mass is seen", "yes") == 0.0
    assert scorer.score_many(["two", "nothing"], ["2", "left lung"]) == [1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT + WordPiece tokenizer saved locally (no model_max_length, as some are)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(["the lesion is in the left lung", "no pleural effusion", "pneumonia of the right lobe",
                             "a mass in the liver"] * 10,
                            trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    hf = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                           sep_token="[SEP]", mask_token="[MASK]")
    hf.save_pretrained(d)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(hf), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(d)
    return str(d), hf, BertModel.from_pretrained(d).eval()


def _bertscore_f1(model, tok, cand, ref, layer):
    """Independent BERTScore F1: greedy cosine matching of layer-`layer` token embeddings, no [CLS]/[SEP]."""
    def emb(s):
        enc = tok(s, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc, output_hidden_states=True).hidden_states[layer][0, 1:-1]
        return torch.nn.functional.normalize(h, dim=-1)
    c, r = emb(cand), emb(ref)
    sim = c @ r.T
    p, rc = sim.max(dim=1).values.mean(), sim.max(dim=0).values.mean()
    return (2 * p * rc / (p + rc)).item()


def test_bertscore_path_matches_reference(tiny_bert):
    path, tok, model = tiny_bert
    scorer = AnswerScorer(bert_model_path=path)
    preds, golds = ["the lesion is in the liver", "pleural effusion"], ["a mass in the left lung", "no effusion"]
    got = scorer.score_many(preds, golds)
    layer = 3  # round(0.75 * 4 layers)
    for p, g, s in zip(preds, golds, got):
        rouge, bleu = scorer.similarity(p, g)
        f1 = min(1.0, max(0.0, _bertscore_f1(model, tok, p, g, layer)))
        assert s == pytest.approx(0.25 * rouge + 0.25 * bleu + 0.5 * f1, abs=1e-5)
        assert 0.0 <= s < 1.0
    assert scorer.score("left lung", "the left lung") == 1.0
    assert scorer.score(None, "the left lung") == 0.0


def test_bert_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="bert_model_path"):
        AnswerScorer(bert_model_path=str(tmp_path / "missing"))
