"""The whole loop learns: a tiny periodic corpus is fitted to near-zero loss."""
from disttrain.data import load_char_corpus
from disttrain.data.source import LanguageModelData
from disttrain.train import Trainer


def test_tiny_corpus_is_overfit_to_near_zero_loss(tiny_job):
    corpus = load_char_corpus("the quick brown fox jumps over the lazy dog. " * 24)
    spec = tiny_job("data.bptt=24", "train.log_every=1000", hidden=32, lr=0.03, epochs=30)
    data = LanguageModelData(corpus, spec.data.batch_size, spec.data.bptt, char_level=True)
    trainer = Trainer.from_job(spec, data=data, progress=False)
    first = trainer.evaluate("train").loss
    trainer.fit()
    last = trainer.evaluate("train").loss
    assert first > 3.0                         # ~ln(29): starts at chance
    assert last < 0.05, f"train loss {first:.3f} -> {last:.4f}"
