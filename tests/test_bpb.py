"""Bits per byte and per character: the validation text's size per token (tokenizers, token cache, the evaluated
batches), the record fields a real loop run writes, old records without them, and fits in bpb across tokenizers."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.__main__ import main
from analysis.load import load_sweep, load_runs_csv, select_target, usable
from analysis.report import fit_all
from analysis.synthetic import isoflop_runs, write_sweep
from scaling import record as R
from scaling.data.tokenizers import TokenizerConfig
from scaling.data.tokens import DataConfig, load_tokens

sys.path.insert(0, str(Path(__file__).parent))
from test_train import tiny_config  # noqa: E402

DATA = Path(__file__).parent / "data"
# Many scripts: 1- to 4-byte UTF-8 characters, so bytes, characters and tokens all differ.
LINES = [line for line in (DATA / "data_unicode.txt").read_text(encoding="utf-8").splitlines() if line.strip()]


def unicode_data(tmp_path: Path, tokenizer: TokenizerConfig, **kw):
    src = tmp_path / "unicode.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in LINES * 3))
    return load_tokens(DataConfig(source="local", path=str(src), cache_dir=str(tmp_path / "cache"), val_fraction=0.25,
                                  tokenizer=tokenizer, **kw))


def recount(data, n_tokens: int, B: int, L: int) -> tuple[int, int]:
    """(UTF-8 bytes, targets) of the evaluated validation targets, through tiktoken's own token bytes: independent of
    Tokenizer.text_sizes."""
    enc, eot, n_bytes, n = data.tokenizer.encoding, data.tokenizer.eot, 0, 0
    for batch_BxLp1 in data.val_batches(n_tokens, B, L):
        targets = batch_BxLp1[:, 1:].ravel()
        n_bytes += sum(len(enc.decode_single_token_bytes(int(t))) for t in targets if t != eot)
        n += targets.size
    return n_bytes, n


# --------------------------------------------------------------------------------------------------------------------
# The text behind the tokens
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, vocab", [("bytes", 257), ("chars", 400), ("bpe", 300)])
def test_token_sizes_count_the_validation_text(tmp_path, kind, vocab):
    data = unicode_data(tmp_path, TokenizerConfig(kind=kind, vocab_size=vocab))
    bytes_V, chars_V = data.tokenizer.text_sizes
    val = np.asarray(data.val)
    # the cache counted the validation documents' text when it was built; the per-token table sums to the same
    assert int(bytes_V[val].sum()) == data.meta["val_bytes"] > data.meta["val_chars"] == int(chars_V[val].sum())
    assert bytes_V[data.tokenizer.eot] == chars_V[data.tokenizer.eot] == 0  # end-of-text spells no text
    val_docs = [LINES[i % len(LINES)] for i in data.meta["split"]["val_doc_indices"]]
    assert data.meta["val_chars"] == sum(map(len, val_docs))
    assert data.meta["val_bytes"] == sum(len(d.encode("utf-8")) for d in val_docs)


def test_same_text_has_the_same_bytes_under_two_tokenizers(tmp_path):
    by_bytes = unicode_data(tmp_path, TokenizerConfig(kind="bytes"))
    by_bpe = unicode_data(tmp_path, TokenizerConfig(kind="bpe", vocab_size=300))
    assert by_bytes.meta["val_bytes"] == by_bpe.meta["val_bytes"] and len(by_bpe.val) < len(by_bytes.val)
    per_token = {}
    for name, d in (("bytes", by_bytes), ("bpe", by_bpe)):
        B, L = 2, 16
        n_tokens = (len(d.val) - 1) // L // B * B * L  # every whole window of the split
        per_token[name] = d.val_text_per_token(n_tokens, B, L)
        n_bytes, n = recount(d, n_tokens, B, L)
        assert per_token[name][0] == pytest.approx(n_bytes / n, rel=1e-12)
    assert per_token["bpe"][0] > 1.2 * per_token["bytes"][0]  # BPE packs more text into a token
    # A model that codes the text in Q nats has loss Q/n per token under either tokenizer: one bpb.
    Q = 1000.0
    n_of = {k: by_bytes.meta["val_bytes"] / v[0] for k, v in per_token.items()}
    bpb = {k: R.text_metrics(Q / n_of[k], per_token[k][0], per_token[k][1])["bpb"] for k in per_token}
    assert bpb["bytes"] == pytest.approx(bpb["bpe"]) == pytest.approx(Q / math.log(2) / by_bytes.meta["val_bytes"])


def test_synthetic_tokens_have_no_text(tmp_path):
    cfg = tiny_config(tmp_path)
    data = load_tokens(cfg.data)
    assert data.tokenizer.text_sizes is None and data.val_text_per_token(1024, 8, 16) is None
    assert R.text_metrics(3.0, None, None) == {"bytes_per_token": None, "chars_per_token": None, "bpb": None,
                                                "bits_per_char": None}


# --------------------------------------------------------------------------------------------------------------------
# The record: a real loop run; validation; old records
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real loop run: compiles a model (~10-30 s on two shared cores)
def test_a_tiny_run_records_bpb_of_the_evaluated_text(tmp_path):
    from scaling.model.decoder import ModelConfig
    from scaling.train.loop import train
    from scaling.train.tracking import read_metrics

    data_cfg = DataConfig(max_bytes=20_000, doc_bytes=1024, val_fraction=0.2, cache_dir=str(tmp_path / "cache"),
                          tokenizer=TokenizerConfig(vocab_size=300, train_bytes=20_000))
    cfg = dataclasses.replace(tiny_config(tmp_path, steps=2, eval_every=2, eval_tokens=1024), data=data_cfg,
                              model=ModelConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=320, seq_len=32))
    rec = train(cfg, tmp_path / "run")
    assert rec["status"] == "completed"
    data = load_tokens(data_cfg)
    n_bytes, n = recount(data, 1024, cfg.train.batch_size, cfg.model.seq_len)
    assert rec["bytes_per_token"] == pytest.approx(n_bytes / n, rel=1e-12)  # exactly the evaluated targets' text
    assert rec["bpb"] == pytest.approx(rec["loss"] / math.log(2) / rec["bytes_per_token"], rel=1e-12)
    assert rec["bits_per_char"] == pytest.approx(rec["loss"] / math.log(2) / rec["chars_per_token"], rel=1e-12)
    # English prose: ~1.5 bytes per token for a 300-token BPE, one character per byte; untrained: ~ln 300 nats/token
    assert 1.2 < rec["bytes_per_token"] < 2.5 and rec["chars_per_token"] <= rec["bytes_per_token"]
    assert R.read_record(tmp_path / "run")["bpb"] == rec["bpb"]
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["eval_bpb"] == pytest.approx(rec["bpb"])
    assert R.summary_fields(rec)["bpb"] == rec["bpb"]  # what the wandb summary carries
    row = R.record_row(rec, tmp_path / "run")
    assert (row["bpb"], row["bits_per_char"]) == (rec["bpb"], rec["bits_per_char"])


@pytest.mark.parametrize("field, value", [("bpb", -1.0), ("bytes_per_token", "2"), ("bits_per_char", 0)])
def test_a_malformed_bpb_field_is_refused(tmp_path, field, value):
    v1 = json.loads((DATA / "record_v1.json").read_text())
    with pytest.raises(R.RecordError, match=rf"field '{field}' is .*expected a positive number or null"):
        R.write_record(tmp_path / "run", v1 | {field: value})
    assert R.write_record(tmp_path / "ok", v1 | {field: None})[field] is None  # null: no text, or no loss


def test_records_without_bpb_still_read_and_are_left_out_of_a_bpb_fit(tmp_path):
    v1 = R.read_record(DATA / "record_v1.json")
    assert "bpb" not in v1 and R.record_row(v1, "x")["bpb"] is None and "bpb" not in R.summary_fields(v1)
    sweep = write_sweep(tmp_path / "old", isoflop_runs(budgets=(1e17, 1e18), n_per_budget=4), failed=0, diverged=0)
    assert usable(load_sweep(sweep))["bpb"].isna().all()  # the table keeps the column: NaN
    with pytest.raises(ValueError, match=r"none of the 8 usable runs carries bpb \(bits per byte\).*--target loss"):
        load_sweep(sweep, target="bpb")
    with_bpb = _add_bpb(sweep, bytes_per_token=3.0, only=4)
    df = load_sweep(sweep, target="bpb")
    assert with_bpb == 4 and len(usable(df)) == 4
    reasons = set(df.loc[df["excluded"] & (df["status"] == "completed"), "reason"])
    assert reasons == {"no bpb: a record written before bits per byte, or tokens without text (synthetic data)"}
    with pytest.raises(ValueError, match="target 'bits' is unknown; use one of loss, bpb, bits_per_char"):
        load_sweep(sweep, target="bits")


# --------------------------------------------------------------------------------------------------------------------
# Fits in bpb: two tokenizers, one text
# --------------------------------------------------------------------------------------------------------------------
def _add_bpb(sweep: Path, bytes_per_token: float, only: int | None = None, tokenizer: str | None = None) -> int:
    """Give the records of `sweep` the text fields of a tokenizer with `bytes_per_token` whose per-token loss makes
    the runs' current loss the bpb: loss per token = bpb * ln 2 * bytes_per_token (Gao et al. 2020 sec. 4)."""
    done = 0
    for path in sorted(sweep.rglob(R.RECORD_FILE)):
        rec = R.read_record(path)
        if rec["status"] != "completed" or (only is not None and done >= only):
            continue
        bpb = rec["loss"]
        loss = bpb * math.log(2) * bytes_per_token
        rec |= {"loss": loss, **R.text_metrics(loss, bytes_per_token, bytes_per_token / 1.1)}
        if tokenizer:
            rec |= {"data": {"source": "embedded:same-text", "source_description": "one text"},
                    "tokenizer": {"identity": tokenizer}}
        R.write_record(path.parent, rec)
        done += 1
    return done


def test_two_tokenizers_on_one_text_fit_one_law_in_bpb(tmp_path):
    runs = isoflop_runs(budgets=(1e17, 1e18, 1e19), n_per_budget=5, noise=0.0)
    both = tmp_path / "both"
    for name, bpt in (("bpeA", 2.0), ("bpeB", 4.5)):  # the same bpb, per-token losses 2.25x apart
        _add_bpb(write_sweep(both / name, runs.assign(name=runs["name"] + name), failed=0, diverged=0), bpt, None,
                 name)
    per_token = usable(load_sweep(both / "bpeA"))["loss"].to_numpy() / usable(load_sweep(both / "bpeB"))["loss"]
    np.testing.assert_allclose(per_token, 2.0 / 4.5)
    with pytest.raises(ValueError, match=r"different data or tokenizers.*with tokenizer bpe"):
        load_sweep(both)  # nats per token of two token sets: not one law
    df = load_sweep(both, target="bpb")  # bits per byte of one text: one law
    assert len(usable(df)) == 30 and set(df["target"]) == {"bpb"}
    np.testing.assert_allclose(df["loss"], df["bpb"])
    np.testing.assert_allclose(df["loss_per_token"] / df["bpb"], np.where(df["name"].str.endswith("A"), 2.0, 4.5)
                               * math.log(2))
    # Approach 2 per tokenizer: in bpb one law (the same minima), in nats per token two (2.25x apart)
    fits = {(name, target): fit_all(load_sweep(both / name, target=target), approaches=(2,), n_bootstrap=0,
                                    n_jobs=1)[0]["approach2"]
            for name in ("bpeA", "bpeB") for target in ("loss", "bpb")}
    for key in ("a", "N_opt", "D_opt"):
        assert fits["bpeA", "bpb"][key] == pytest.approx(fits["bpeB", "bpb"][key], rel=1e-9)
    loss_opt = {k: pd.DataFrame(f["minima"])["loss_opt"].to_numpy() for k, f in fits.items()}
    np.testing.assert_allclose(loss_opt["bpeA", "bpb"], loss_opt["bpeB", "bpb"], rtol=1e-9)
    np.testing.assert_allclose(loss_opt["bpeA", "loss"] / loss_opt["bpeB", "loss"], 2.0 / 4.5, rtol=1e-9)
    pooled, _ = fit_all(df, approaches=(2,), n_bootstrap=0, n_jobs=1)
    assert pooled["conventions"]["target"] == "bpb"
    assert pooled["approach2"]["N_opt"] == pytest.approx(fits["bpeA", "bpb"]["N_opt"], rel=1e-6)
    # bits per character: each run's chars per token (bytes / 1.1) scale it; runs of another source still refused
    chars = select_target(load_sweep(both / "bpeA"), "bits_per_char")
    np.testing.assert_allclose(chars["loss"], chars["bpb"] * 1.1)
    rec_path = next((both / "bpeB").rglob(R.RECORD_FILE))
    R.write_record(rec_path.parent, R.read_record(rec_path) | {"data": {"source": "embedded:other-text"}})
    with pytest.raises(ValueError, match=r"different data.*other-text"):
        load_sweep(both, target="bpb")


def test_cli_target_bpb_on_records_and_runs_csv(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "s", isoflop_runs(budgets=(1e17, 1e18), n_per_budget=4), failed=0, diverged=0)
    _add_bpb(sweep, bytes_per_token=3.0)
    out = tmp_path / "fit.json"
    assert main(["fit", "--sweep", str(sweep), "--approach", "2", "--bootstrap", "0", "--target", "bpb",
                 "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["conventions"]["target"] == "bpb"
    minima = pd.DataFrame(res["approach2"]["minima"])
    assert minima["loss_opt"].max() < 5  # in bits per byte (the fixture's bpb), not the per-token loss (x 2.08)
    from scaling.record import COLUMNS

    rows = R.read_runs(sweep)
    csv = tmp_path / "runs.csv"
    pd.DataFrame(rows, columns=COLUMNS).to_csv(csv, index=False)
    np.testing.assert_allclose(load_runs_csv(csv, target="bpb")["loss"].dropna(),
                               load_sweep(sweep, target="bpb")["loss"].dropna())
    plain = tmp_path / "plain.csv"
    plain.write_text("N,D,loss\n1e6,1e9,3\n")
    assert main(["fit", "--csv", str(plain), "--target", "bpb"]) == 2
    assert "for a CSV with your own columns name the bpb column with --loss" in capsys.readouterr().err


def test_predict_and_verify_in_bpb(tmp_path, capsys):
    """`predict --target bpb` commits L_opt in bits per byte and `verify` reads the prediction's target back."""
    from analysis.synthetic import chinchilla_loss
    from test_analysis_predict import TRUTH, family_runs, flops_per_token

    write_sweep(tmp_path / "fit", family_runs([5e11, 1.5e12, 5e12, 1.5e13]), failed=0, diverged=0)
    _add_bpb(tmp_path / "fit", bytes_per_token=3.0)  # bpb = the law's loss; loss per token = bpb * 3 ln 2
    out = {}
    for target in ("loss", "bpb"):
        assert main(["predict", str(tmp_path / "fit"), "--at-C", "6e13", "--out", str(tmp_path / target),
                     "--bootstrap", "4", "--jobs", "1", "--target", target]) == 0
        out[target] = json.loads((tmp_path / target / "prediction.json").read_text())
    assert out["bpb"]["conventions"]["target"] == "bpb"
    assert "bits per byte" in (tmp_path / "bpb" / "prediction.md").read_text()
    # the fits are invariant to a constant unit: the same N_opt, L_opt in the other unit
    L = {t: out[t]["prediction"]["L_opt"] for t in out}
    assert L["loss"] / L["bpb"] == pytest.approx(3.0 * math.log(2), rel=1e-3)
    assert out["loss"]["prediction"]["N_opt"] == pytest.approx(out["bpb"]["prediction"]["N_opt"], rel=1e-3)
    sizes = np.array([0.5, 1.0, 2.0]) * out["bpb"]["prediction"]["N_opt"]
    D = 6e13 / flops_per_token(sizes)
    ver = pd.DataFrame({"name": ["v-half", "v-pred", "v-double"], "N": sizes, "D": D, "C": 6e13, "budget": 6e13,
                        "loss": chinchilla_loss(sizes, D, **TRUTH)})
    _add_bpb(write_sweep(tmp_path / "verify", ver, failed=0, diverged=0), bytes_per_token=3.0)
    assert main(["verify", str(tmp_path / "bpb" / "prediction.json"), str(tmp_path / "verify"), "--out",
                 str(tmp_path / "bpb")]) == 0
    assert abs(json.loads((tmp_path / "bpb" / "verification.json").read_text())["rel_error_L_opt"]) < 0.01
