"""`gradsel select` and `gradsel inspect` on a real score store (the built-in tiny model): the short
table and the summary file, the kept records with their original fields (JSONL and HF datasets),
outputs refused inside a store / onto a directory / into a read-only place, and the inspect plots
(title, --by, --policy, legend placement, --log ticks)."""
from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from gradsel_core.cli import main
from gradsel_core.store import ScoreStore

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("math", "chat", "code")


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """(data.jsonl path, its rows, score store path): 30 records with nested fields, scored by `tiny`."""
    d = tmp_path_factory.mktemp("scored")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        words = " ".join(["alpha", "beta", "gamma", "delta"][j % 4] for j in range(int(rng.integers(1, 12))))
        row = {"id": f"r{i:02d}", "task": TASKS[i % 3], "meta": {"k": i, "tags": ["a", "b"][: i % 3]}}
        if i % 4 == 3:
            row.update(prompt="Q: " + words, response=" A: ok")
        else:
            row["text"] = words + " é"
        rows.append(row)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    store = d / "scores"
    assert main(["score", "--model", "tiny", "--data", str(data), "--out", str(store), "--batch-size", "8",
                 "--no-progress"]) == 0
    return str(data), rows, str(store)


def _run(capsys, argv):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# -- select -------------------------------------------------------------------------------------------


def test_select_prints_a_short_table_and_writes_the_summary_next_to_out(scored, tmp_path, capsys):
    _, _, store = scored
    out = tmp_path / "sel" / "kept.jsonl"
    rc, text, err = _run(capsys, ["select", "--scores", store, "--group-by", "task", "--out", str(out)])
    assert rc == 0, err
    lines = text.strip().splitlines()
    assert len(lines) <= 10 and "{" not in text  # a table, not the ~60-line JSON summary
    rows = {ln.split()[0]: ln.split() for ln in lines if ln.startswith("  ") and not ln.strip().startswith("group")}
    assert set(rows) == {"math", "chat", "code", "all"}
    summary = json.loads((tmp_path / "sel" / "kept.summary.json").read_text())
    assert summary["group_by"] == "task" and summary["n"] == 30 and set(summary["groups"]) == set(TASKS)
    assert summary["output"] == {"path": str(out), "format": "jsonl", "records": summary["kept"], "content": "scores"}
    # the table's numbers are the summary's: records and kept per group, and the total
    for t in TASKS:
        assert int(rows[t][1]) == summary["groups"][t]["n"] and int(rows[t][4]) == summary["groups"][t]["kept"]
    assert int(rows["all"][1]) == 30 and int(rows["all"][4]) == summary["kept"]
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == summary["kept"] and {"id", "norm", "loss", "tokens"} == set(kept[0])
    # --summary-json elsewhere
    other = tmp_path / "elsewhere" / "s.json"
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", str(out), "--summary-json", str(other)])
    assert rc == 0, err
    assert json.loads(other.read_text())["kept"] == len(out.read_text().splitlines())


def test_select_data_writes_the_kept_records_with_their_original_fields(scored, tmp_path, capsys):
    data, rows, store = scored
    out = tmp_path / "kept.jsonl"
    rc, _, err = _run(capsys, ["select", "--scores", store, "--ratio", "0.5", "--loss-filter-std", "none",
                               "--data", data, "--out", str(out)])
    assert rc == 0, err
    kept = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    from gradsel_core.selection import select

    sel = select(ScoreStore.open(store), ratio=0.5, loss_filter_std=None)
    want = [r for r, k in zip(rows, sel.kept_mask) if k]  # file order
    assert len(want) == 15 and kept == want  # every field as written, nested ones and "é" included
    summary = json.loads((tmp_path / "kept.summary.json").read_text())
    assert summary["output"]["content"] == "records from " + os.path.abspath(data)


def test_select_data_must_be_the_scored_file(scored, tmp_path, capsys):
    data, rows, store = scored
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    rc, _, err = _run(capsys, ["select", "--scores", store, "--data", str(short), "--out", str(tmp_path / "k.jsonl")])
    assert rc == 2 and "has 29 records" in err and "has 30" in err and err.count("\n") == 1
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps(r) + "\n" for r in [rows[1], rows[0]] + rows[2:]))
    rc, _, err = _run(capsys, ["select", "--scores", store, "--data", str(swapped), "--out", str(tmp_path / "k.jsonl")])
    assert rc == 2 and "record 0 has id 'r01'" in err and "'r00'" in err
    assert not (tmp_path / "k.jsonl").exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".gradsel-tmp-")]
    rc, _, err = _run(capsys, ["select", "--scores", store, "--data", str(tmp_path), "--out", str(tmp_path / "k.jsonl")])
    assert rc == 2 and "--data" in err and "is a directory" in err
    before = open(data, "rb").read()
    rc, _, err = _run(capsys, ["select", "--scores", store, "--data", data, "--out", data])
    assert rc == 2 and "is the --data file" in err and open(data, "rb").read() == before


@pytest.mark.needs_datasets
@pytest.mark.parametrize("id_kind", ["int", "str"])
def test_select_data_checks_every_batch_record_by_record_where_it_differs(tmp_path, capsys, monkeypatch, id_kind):
    """`select --data` checks ids and content digests a batch at a time (one array compare each); a batch that
    differs anywhere is checked record by record, so the error names the first record that differs, in any
    batch, and the kept records are written in file order whatever the batch size."""
    from gradsel_core.commands import select as S
    from gradsel_core.jsonl import record_digest

    monkeypatch.setattr(S, "DATA_BATCH", 4)
    rows = [{"id": i if id_kind == "int" else f"k{i}", "text": f"record {i}", "n": i} for i in range(23)]
    rng = np.random.default_rng(0)
    store = tmp_path / "s"
    ScoreStore.from_arrays(store, rng.random(23), rng.random(23), ids=[r["id"] for r in rows],
                           record_sha256=[record_digest(r) for r in rows])
    data = tmp_path / "d.jsonl"

    def run(recs):
        data.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return _run(capsys, ["select", "--scores", str(store), "--out", str(tmp_path / "k.jsonl"),
                             "--data", str(data), "--policy", "keep_bottom", "--ratio", "0.5"])

    rc, _, err = run(rows)
    assert rc == 0, err
    sel = ScoreStore.open(store)
    kept = np.sort(np.argsort(sel.norms, kind="stable")[:11])
    assert [json.loads(x) for x in (tmp_path / "k.jsonl").read_text().splitlines()] == [rows[i] for i in kept]
    edited = [dict(r) for r in rows]
    edited[13]["text"] = "changed"
    rc, _, err = run(edited)
    assert rc == 2 and "record 13 " in err and "content changed" in err
    swapped = [dict(r) for r in rows]
    swapped[9]["id"] = 99 if id_kind == "int" else "k99"
    rc, _, err = run(swapped)
    assert rc == 2 and "record 9 has id" in err
    rc, _, err = run(rows[:22])
    assert rc == 2 and "has 22 records" in err
    rc, _, err = run(rows + [{"id": 23, "text": "extra"}])
    assert rc == 2 and "more records than the store" in err


def test_select_hf_datasets_folder(scored, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    data, rows, store = scored
    out = tmp_path / "kept_ds"
    base = ["select", "--scores", store, "--data", data]
    rc, _, err = _run(capsys, base + ["--format", "hf", "--out", str(out), "--ratio", "0.3"])
    assert rc == 0, err
    ds = datasets.load_from_disk(str(out))
    jsonl = tmp_path / "kept.jsonl"
    assert _run(capsys, base + ["--out", str(jsonl), "--ratio", "0.3"])[0] == 0
    want = [json.loads(x) for x in jsonl.read_text(encoding="utf-8").splitlines()]
    got = ds.to_list()
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 9
    assert all(g["task"] == w["task"] and g["meta"]["k"] == w["meta"]["k"] for g, w in zip(got, want))
    assert json.loads((tmp_path / "kept_ds.summary.json").read_text())["output"]["format"] == "hf"
    # a rerun replaces the earlier dataset folder; a folder that is not a dataset is refused
    rc, _, err = _run(capsys, base + ["--format", "hf", "--out", str(out), "--ratio", "0.1"])
    assert rc == 0, err
    assert len(datasets.load_from_disk(str(out))) == 3 and not [n for n in os.listdir(tmp_path) if "gradsel-" in n]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = _run(capsys, ["select", "--scores", store, "--format", "hf", "--out", str(mine)])
    assert rc == 2 and "not a saved dataset" in err and (mine / "notes.txt").read_text() == "keep me"


def test_select_hf_without_datasets_says_what_to_install(scored, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    rc, _, err = _run(capsys, ["select", "--scores", scored[2], "--format", "hf", "--out", str(tmp_path / "ds")])
    assert rc == 2 and "pip install 'gradsel[datasets]'" in err and not (tmp_path / "ds").exists()


def test_select_refuses_outputs_inside_a_store(scored, tmp_path, capsys):
    _, _, store = scored
    manifest = os.path.join(store, "manifest.json")
    before = {n: open(os.path.join(store, n), "rb").read() for n in os.listdir(store)}
    for argv in (["--out", manifest], ["--out", os.path.join(store, "sub", "kept.jsonl")],
                 ["--out", os.path.join(store, "..", os.path.basename(store), "k.jsonl")],
                 ["--out", str(tmp_path / "k.jsonl"), "--summary-json", os.path.join(store, "s.json")],
                 ["--out", os.path.join(store, "ds"), "--format", "hf"]):
        rc, _, err = _run(capsys, ["select", "--scores", store] + argv)
        assert rc == 2 and "inside the score store" in err and "Write it elsewhere" in err, argv
    after = {n: open(os.path.join(store, n), "rb").read() for n in os.listdir(store)}
    assert after == before and ScoreStore.open(store).meta["complete"]
    # a store other than --scores is a store too
    other = tmp_path / "copy"
    os.makedirs(other)
    with open(manifest, "rb") as f:
        (other / "manifest.json").write_bytes(f.read())
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", str(other / "k.jsonl")])
    assert rc == 2 and "inside the score store" in err
    # a manifest.json that is not a store's does not make a folder a store
    web = tmp_path / "webapp"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my app"}')
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", str(web / "k.jsonl")])
    assert rc == 0, err


def test_select_out_onto_a_directory_or_a_read_only_place(scored, tmp_path, capsys):
    _, _, store = scored
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", str(tmp_path)])
    assert rc == 2 and f"--out {tmp_path} is a directory" in err and "kept.jsonl" in err
    assert err.startswith("gradsel select: error: ") and err.count("\n") == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", str(afile / "k.jsonl")])
    assert rc == 2 and "cannot write there" in err and "not a directory" in err
    rc, _, err = _run(capsys, ["select", "--scores", store, "--format", "hf", "--out", str(afile)])
    assert rc == 2 and "is a file" in err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = str(ro / "sub" / "k.jsonl")
    else:  # root writes through permission bits; sysfs refuses new files even to root
        target = "/sys/gradsel-select-test/kept.jsonl"
    rc, _, err = _run(capsys, ["select", "--scores", store, "--out", target])
    assert rc == 2 and f"--out {target}: cannot write there" in err and "writable place" in err
    assert "Traceback" not in err and err.count("\n") == 1


# -- inspect ------------------------------------------------------------------------------------------


def _args(argv):
    import argparse

    from gradsel_core.commands import inspect as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    return p.parse_args(argv)


def _figure(store_dir, argv=()):
    """The figure `inspect --plot` draws for these arguments (rendered, so extents are final)."""
    from gradsel_core.commands import inspect as cmd
    from gradsel_core.commands.select import run_policy

    args = _args([store_dir] + list(argv))
    store = ScoreStore.open(store_dir)
    sel = run_policy(store, args) if args.policy else None
    groups, n_groups = cmd.split_groups(store, args.by, args.max_groups)
    fig = cmd.make_figure(store, args.bins, args.log, groups, args.by, n_groups, sel)
    fig.canvas.draw()
    return fig, store, sel


def test_inspect_field_counts_equal_a_str_per_value(tmp_path):
    """The `field:` lines count values by the store's codes or vectorized groups: the same values and counts
    as ``np.unique`` of ``str`` of every value (ints, bools, floats with NaN and -0.0, strings, mixed)."""
    from gradsel_core.commands.inspect import field_counts

    rng = np.random.default_rng(0)
    n = 200
    fields = {"s": rng.choice(["b", "a", "é", "a b"], n), "i": rng.integers(-3, 3, n), "b": rng.random(n) < 0.3,
              "f": rng.choice([0.5, 1.0, 1e20], n), "fn": rng.choice([0.5, np.nan, -0.0, 0.0], n),
              "mixed": np.array([["x", 1, None, 2.5][k] for k in rng.integers(0, 4, n)], dtype=object)}
    store = ScoreStore.from_arrays(tmp_path / "s", rng.random(n), rng.random(n), fields=fields)
    for name, col in store.fields.items():
        want = np.unique(np.asarray([str(x) for x in col]), return_counts=True)
        got = field_counts(store, name, col)
        assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist(), name


def test_inspect_plot_names_store_and_model_and_keeps_labels_off_the_bars(scored, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    _, _, store = scored
    png = tmp_path / "h.png"
    rc, text, err = _run(capsys, ["inspect", store, "--bins", "8", "--plot", str(png)])
    assert rc == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig, st, _ = _figure(store, ["--bins", "8"])
    title = fig._suptitle.get_text()
    assert store in title and "TinyGPT" in title and "params=trainable" in title
    (ax,) = fig.axes
    assert not ax.texts  # the quantile labels are no longer drawn over the bars
    leg = ax.get_legend()
    labels = [t.get_text() for t in leg.get_texts()]
    q = np.quantile(st.norms[np.isfinite(st.norms)].astype(np.float64), [0.1, 0.5, 0.9])
    assert labels[1:] == [f"p10 = {q[0]:.4g}", f"p50 = {q[1]:.4g}", f"p90 = {q[2]:.4g}"]
    assert not leg.get_window_extent().overlaps(ax.get_window_extent())  # the legend is beside the axes
    assert sum(p.get_height() for p in ax.patches) == len(st)
    plt.close(fig)


def test_inspect_by_field_one_histogram_per_group(scored, tmp_path, capsys):
    _, rows, store = scored
    rc, text, err = _run(capsys, ["inspect", store, "--bins", "6", "--by", "task"])
    assert rc == 0, err
    for t in TASKS:
        head = text.index(f"task = {t} (10 records)")
        lines = text[head:].splitlines()[1:7]
        assert all(ln.startswith("  [") for ln in lines) and sum(int(ln.split()[-1]) for ln in lines) == 10
    rc, _, err = _run(capsys, ["inspect", store, "--by", "nope"])
    assert rc == 2 and "--by 'nope'" in err and "its fields: task" in err
    rc, text, _ = _run(capsys, ["inspect", store, "--by", "task", "--max-groups", "2"])
    assert "the 2 largest of 3 groups of task" in text
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig, st, _ = _figure(store, ["--bins", "6", "--by", "task"])
    assert len(fig.axes) == 3
    for ax, t in zip(fig.axes, sorted(TASKS)):
        assert ax.get_title(loc="left") == f"task = {t}  (10 records)"
        assert sum(p.get_height() for p in ax.patches) == 10
    plt.close(fig)


def test_inspect_policy_marks_what_the_policy_keeps(scored, capsys):
    _, _, store = scored
    from gradsel_core.selection import select

    sel = select(ScoreStore.open(store), policy="median_band", ratio=0.2)
    rc, text, err = _run(capsys, ["inspect", store, "--bins", "5", "--policy", "median_band", "--ratio", "0.2"])
    assert rc == 0, err
    assert f"# kept by median_band ratio 0.2 (loss filter ±1 std): {sel.summary['kept']} of 30" in text
    hist = [ln for ln in text.splitlines() if ln.startswith("  [")]
    assert len(hist) == 5 and sum(int(ln.split()[-1]) for ln in hist) == sel.summary["kept"] == 6
    bars = [re.match(r"  \[[^,]+, *[^)\]]+[)\]] (\S*)", ln).group(1) for ln in hist]
    assert any("#" in b and "." in b for b in bars)  # a bin with kept and dropped records
    assert all(set(b) <= {"#", "."} for b in bars) and any(b and "#" not in b for b in bars)
    # per group, with the selection made per group as `select --group-by` does
    rc, text, err = _run(capsys, ["inspect", store, "--bins", "4", "--by", "task", "--policy", "keep_bottom",
                                  "--ratio", "0.3", "--group-by", "task", "--loss-filter-std", "none"])
    assert rc == 0, err
    for t in TASKS:
        assert f"task = {t} (10 records, 3 kept):" in text
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig, st, sel = _figure(store, ["--bins", "5", "--policy", "median_band"])
    (ax,) = fig.axes
    heights = [p.get_height() for p in ax.patches]
    assert sum(heights) == 30 + sel.summary["kept"]  # all records, then the kept overlay
    assert "kept by median_band" in fig._suptitle.get_text()
    plt.close(fig)


def test_inspect_log_edges_and_readable_ticks(scored, capsys):
    _, _, store = scored
    rc, text, err = _run(capsys, ["inspect", store, "--bins", "6", "--log"])
    assert rc == 0, err
    assert "log scale: each edge x" in text
    st = ScoreStore.open(store)
    lo, hi = float(st.norms.min()), float(st.norms.max())
    edges = [float(ln.split("[")[1].split(",")[0]) for ln in text.splitlines() if ln.startswith("  [")]
    assert edges[0] == pytest.approx(lo, rel=1e-3) and len(edges) == 6
    assert np.allclose(edges, np.geomspace(lo, hi, 7)[:-1], rtol=1e-3)  # log-spaced edges, printed as norms
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig, _, _ = _figure(store, ["--bins", "6", "--log"])
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(labels) >= 3 and all("$" not in s and "times" not in s for s in labels)
    assert all(lo * 0.97 <= float(s) <= hi * 1.03 for s in labels)
    assert not [t.get_text() for t in ax.xaxis.get_minorticklabels() if t.get_text()]
    plt.close(fig)


def test_inspect_log_ticks_wide_range():
    from gradsel_core.commands.inspect import log_ticks

    assert log_ticks(4e-4, 460) == [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]
    assert log_ticks(7.03, 8.97) == [7.0, 7.4, 7.7, 8.1, 8.5, 9.0]
    assert log_ticks(2.0, 2.0) == [2.0]


def test_inspect_plot_errors(scored, tmp_path, capsys, monkeypatch):
    _, _, store = scored
    rc, text, err = _run(capsys, ["inspect", store, "--plot", os.path.join(store, "h.png")])
    assert rc == 2 and "inside the score store" in err and not os.path.exists(os.path.join(store, "h.png"))
    rc, text, err = _run(capsys, ["inspect", store, "--plot", str(tmp_path)])
    assert rc == 2 and f"--plot {tmp_path} is a directory" in err and "norms.png" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, text, err = _run(capsys, ["inspect", store, "--plot", str(tmp_path / "h.png")])
    assert rc == 2 and text == ""  # refused before any work
    assert err == "gradsel inspect: error: --plot needs matplotlib: pip install 'gradsel[plot]' (or leave out --plot)\n"


@pytest.mark.parametrize("kind", ["str", "int", "mixed"])
def test_select_table_rows_by_group_codes_equal_a_scan_per_label(tmp_path, kind):
    """The per-group table rows take each group's records from the selection's group codes: the same rows
    as a scan of every value per label, for string (stored codes), integer and mixed-kind fields."""
    import gradsel_core as gs
    from gradsel_core.commands.select import MAX_TABLE_GROUPS, _row, _same_label, table_rows

    rng = np.random.default_rng(1)
    n = 300
    col = {"str": rng.choice(["b", "a", "c"], n).astype(object), "int": rng.integers(0, 30, n),
           "mixed": np.array([["1", 1, None, 2.5][k] for k in rng.integers(0, 4, n)], dtype=object)}[kind]
    store = ScoreStore.from_arrays(tmp_path / "s", rng.random(n), rng.random(n), fields={"g": col})
    sel = gs.select(store, group_by="g", policy="keep_bottom", ratio=0.5)
    field = np.asarray(store.fields["g"])
    norms = np.asarray(store.norms, dtype=np.float64)
    want = []
    for key, g in list(sel.summary["groups"].items())[:MAX_TABLE_GROUPS]:
        m = np.asarray([_same_label(v, g["label"]) for v in field.tolist()], dtype=bool)
        want.append(_row(str(g["label"]), g, norms[m], sel.kept_mask[m]))
    for name in ("g", None):
        got = table_rows(store, sel, field, name)
        assert [r.__dict__ for r in got[:-1]] == [r.__dict__ for r in want]
