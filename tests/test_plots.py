"""Plots: each writes a PNG of the expected size; helpers (running best, Pareto front, log
reading, a search's settings) give exact answers; the CLI writes beside its input."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import plots as plots_cli  # the script (its CLI)
from blockswap import plots
from blockswap.cli import run_cli
from conftest import one_error_line


def _png_size(path):
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.format, im.size


def _search_df(n=60, goal=800_000, seed=0):
    rng = np.random.default_rng(seed)
    params = (goal * (1 + rng.uniform(-0.025, 0.025, n))).astype(int)
    return pd.DataFrame(dict(index=np.arange(n), convs=["['Conv']"] * n, params=params,
                             macs=(params * rng.uniform(90, 160, n)).astype(int),
                             fisher=rng.lognormal(np.log(0.02), 0.5, n)))


def _log_df(epochs=12):
    ep = np.arange(1, epochs + 1)
    err = 80 * np.exp(-ep / 4) + 5
    return pd.DataFrame(dict(epoch=ep, lr=0.1 * 0.2 ** (ep // 5), train_loss=err / 30,
                             train_error=err, val_loss=err / 25, val_error=err + 2,
                             seconds=40.0))


def test_running_best_and_pareto_front_exact():
    assert plots.running_best([1, 3, 2, 5, 5, 4, 7]).tolist() == [0, 1, 3, 6]
    # params 100, 200, 300, 400 with errors 9, 10, 7, 8: only 100 and 300 are on the front
    assert plots.pareto_front([300, 100, 400, 200], [7, 9, 8, 10]).tolist() == [1, 0]
    assert plots.human(800_000) == "800K" and plots.human(2_243_546) == "2.24M"


def test_plot_search_writes_png(tmp_path):
    df = _search_df()
    out = tmp_path / "deep" / "folder" / "search.png"
    assert plots.plot_search(df, str(out), "fisher", {"param_goal": 800_000}) == str(out)
    assert _png_size(out) == ("PNG", (1560, 430))   # 3 panels of 5.2 x 4.3 in at 100 dpi
    # no MACs column: params panel and scoring-order panel only
    df2 = df.drop(columns=["macs"]).rename(columns={"fisher": "snip"})
    assert _png_size(plots.plot_search(df2, str(tmp_path / "s2.png"), "snip")) == \
        ("PNG", (1040, 430))


def test_goal_and_score_come_from_the_settings_beside_the_results(tmp_path):
    df = _search_df().rename(columns={"fisher": "synflow"}).assign(snip=1.0)
    path = tmp_path / "rank_at_800000.csv"
    df.to_csv(path, index=False)
    with pytest.raises(plots.UserError, match="pass --score"):   # nothing names the proxy
        plots.plot_search(str(path), str(tmp_path / "x.png"))
    settings = {"proxy": "rank:synflow+snip", "param_goal": 800_000, "mac_goal": None,
                "latency_goal": None, "tol": 0.05}
    (tmp_path / "rank_at_800000.json").write_text(json.dumps(settings))
    assert plots.settings_beside(str(path)) == settings
    assert plots.score_column(df, None, settings) == "synflow"   # the ensemble's first proxy
    assert plots.score_column(df, "snip", settings) == "snip"    # --score wins
    assert _png_size(plots.plot_search(str(path), str(tmp_path / "s.png")))[0] == "PNG"
    assert plots.settings_beside(str(tmp_path / "other.csv")) == {}


def test_plot_search_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(plots.UserError, match="not found"):
        plots.plot_search(str(tmp_path / "nope.csv"), str(tmp_path / "x.png"), "fisher")
    with pytest.raises(plots.UserError, match="no column 'fisher'"):
        plots.plot_search(_search_df().drop(columns=["fisher"]), str(tmp_path / "x.png"),
                          "fisher")
    assert not (tmp_path / "x.png").exists()


def test_plot_training_of_a_resumed_run_killed_mid_write(tmp_path):
    log = _log_df()
    csv_path = tmp_path / "run.log.csv"
    log.to_csv(csv_path, index=False)
    out = plots.plot_training(str(csv_path), str(tmp_path / "csv.png"))
    assert _png_size(out) == ("PNG", (1500, 400))
    # A resumed run (epoch 5 twice: the later row wins) killed while writing epoch 13
    rows = log.to_dict("records")
    resumed = pd.DataFrame(rows[:5] + [dict(rows[4], val_error=1.5)] + rows[5:])
    text = resumed.to_csv(index=False) + "13,0.0"
    csv_path.write_text(text)
    df = plots.read_log(str(csv_path))
    assert df["epoch"].tolist() == list(range(1, 13))
    assert df.loc[df["epoch"] == 5, "val_error"].item() == 1.5
    assert _png_size(plots.plot_training(str(csv_path), str(tmp_path / "j.png")))[1] == (1500, 400)


def test_plot_sweep_and_study(tmp_path):
    sweep = pd.DataFrame(dict(
        name=["bs_162K", "bs_404K", "bs_811K", "wrn_16_1", "wrn_40_2_1.DConvA4", "wrn_16_2"],
        params=[162e3, 404e3, 811e3, 175e3, 300e3, 693e3], error=[6.3, 5.0, 4.3, 8.8, 6.7, 6.5],
        method=["blockswap"] * 3 + ["moonshine"] * 3))
    path = tmp_path / "sweep.csv"
    sweep.to_csv(path, index=False)
    out = plots.plot_sweep(str(path), str(tmp_path / "sweep.png"))
    assert _png_size(out) == ("PNG", (900, 600))
    no_method = sweep.drop(columns=["method"])
    assert _png_size(plots.plot_sweep(no_method, str(tmp_path / "s.png")))[1] == (900, 600)

    rng = np.random.default_rng(0)
    err = rng.uniform(8, 15, 12)
    study = pd.DataFrame(dict(fisher=-err + rng.normal(size=12),
                              grad_norm=rng.uniform(1, 4, 12),
                              synflow=10 ** rng.uniform(30, 45, 12),
                              params=rng.uniform(7e5, 9e5, 12), val_error=err))
    out = plots.plot_study(study, str(tmp_path / "study.png"))
    assert _png_size(out) == ("PNG", (1350, 760))   # 4 proxies: 3 columns x 2 rows
    with pytest.raises(plots.UserError, match="naswot"):
        plots.plot_study(study, str(tmp_path / "x.png"), proxies=["naswot"])


def test_cli_writes_beside_the_input_and_reports_errors(tmp_path, capsys):
    path = tmp_path / "fisher_at_800000.csv"
    _search_df().to_csv(path, index=False)
    out = run_cli(plots_cli.main, plots_cli.get_args_parser(), ["search", str(path), "--score", "fisher",
                                                        "--param_goal", "800000"])
    assert out == str(tmp_path / "fisher_at_800000.png")
    assert _png_size(out)[0] == "PNG"
    log = tmp_path / "t.log.csv"
    _log_df().to_csv(log, index=False)
    custom = tmp_path / "plots" / "curves.png"
    assert run_cli(plots_cli.main, plots_cli.get_args_parser(),
                   ["training", str(log), "-o", str(custom)]) == str(custom)
    assert custom.stat().st_size > 0
    bad = tmp_path / "bad.csv"
    bad.write_text("name,params\nx,1\n")
    with pytest.raises(SystemExit) as e:
        run_cli(plots_cli.main, plots_cli.get_args_parser(), ["sweep", str(bad)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: sweep table: missing column(s) error; has name, params")


# --------------------------------------------------------------------------------------------
# Output format and one-epoch curves.
# --------------------------------------------------------------------------------------------

def test_plot_output_format_follows_the_suffix(tmp_path, capsys):
    log = tmp_path / "x.log.csv"
    log.write_text("epoch,lr,train_loss,train_error,val_loss,val_error,seconds\n"
                   "1,0.1,2.0,80,2.1,85,3\n2,0.1,1.5,60,1.7,70,3\n")
    parser = plots_cli.get_args_parser()
    for suffix, magic in (("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")):
        plots_cli.main(parser.parse_args(["training", str(log), "-o", str(tmp_path / f"x.{suffix}")]))
        assert (tmp_path / f"x.{suffix}").read_bytes().startswith(magic)
    one_error_line(capsys, lambda: run_cli(plots_cli.main, parser,
                   ["training", str(log), "-o", str(tmp_path / "x.pdff")]), tmp_path)


def test_one_epoch_curves_have_markers(monkeypatch, tmp_path):
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, out: figs.append(fig) or out)
    log = pd.DataFrame(dict(epoch=[1], lr=[0.1], train_loss=[2.0], train_error=[80.0],
                            val_loss=[2.1], val_error=[85.0], seconds=[3.0]))
    plots.plot_training(log, str(tmp_path / "x.png"))
    ax_err, ax_loss, ax_lr = figs[0].axes
    for ax in (ax_loss, ax_lr):
        assert ax.get_lines() and all(line.get_marker() not in (None, "None", "")
                                      for line in ax.get_lines())
