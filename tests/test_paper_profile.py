"""The paper profile on this machine: a notebook's ImageNet path run end to end by papermill on a fake
ImageNet folder with a locally saved torchvision state dict (random init), and the clean stop of a
paper run that lacks its inputs."""
import json
import shlex

import pytest
import torch

from lowbit import imagenet, paths, profiles

from test_imagenet import fake_imagenet

ROOT = paths.project_root()


@pytest.fixture
def restore_imagenet_inputs():
    before = imagenet.active()
    yield
    imagenet.use(**before)


def test_paper_profile_without_inputs_says_what_it_needs(restore_imagenet_inputs, monkeypatch, tmp_path):
    monkeypatch.delenv("LOWBIT_PROFILE", raising=False)
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(tmp_path))
    knobs = profiles.notebook_defaults("00-baselines")
    knobs.pop("profile")
    with pytest.raises(profiles.PaperInputsMissing) as err:
        profiles.resolve("paper", notebook="00-baselines", **knobs)
    text = str(err.value)
    assert "needs data_dir and weights" in text and "train/ and val/" in text and "'DEFAULT'" in text
    assert "papermill notebooks/00-baselines.ipynb" in text and "-p data_dir" in text
    assert err.value._render_traceback_()[0].startswith("PaperInputsMissing: profile='paper'")  # no traceback
    with pytest.raises(profiles.PaperInputsMissing, match="needs weights, not given"):
        profiles.resolve("paper", notebook="00-baselines", **dict(knobs, data_dir=str(fake_imagenet(tmp_path / "in"))))
    assert profiles.resolve("default", notebook="00-baselines", **knobs) == "default"  # nothing needed there


def _papermill(notebook, out, params, tmp_path, monkeypatch):
    import papermill

    monkeypatch.delenv("LOWBIT_PROFILE", raising=False)
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(tmp_path / "outputs"))
    papermill.execute_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"), str(out), parameters=params,
                               kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False)
    return json.loads(out.read_text())


def _text(nb) -> str:
    return "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def paper_inputs(tmp_path_factory):
    """A fake ImageNet (3 classes x 4 images per split) and a saved random-init ResNet-18 state dict."""
    root = tmp_path_factory.mktemp("paper")
    data_dir = fake_imagenet(root / "imagenet", classes=3, per_class=4)
    torch.manual_seed(0)
    state = root / "resnet18.pth"
    torch.save(imagenet.build("resnet18").state_dict(), state)
    return data_dir, state


def test_notebook_00_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    data_dir, state = paper_inputs
    nb = _papermill("00-baselines", tmp_path / "00.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "imagenet_models": ["resnet18"], "n_val": 4, "n_test": 200}, tmp_path, monkeypatch)
    text = _text(nb)
    assert "ImageNet FP baselines: paper profile only" not in text
    table = (tmp_path / "outputs" / "figures" / "fp_baselines_imagenet.csv").read_text().splitlines()
    assert table[0].startswith("model,weights,params,val images,top-1") and len(table) == 2
    row = table[1].split(",")
    assert row[0] == "resnet18" and row[1] == str(state) and row[3] == "4"  # n_val images, our weights
    assert not (ROOT / "figures" / "fp_baselines_imagenet.csv").exists()  # never into the committed figures


def test_notebook_00_paper_run_without_data_dir_stops_at_setup(tmp_path, monkeypatch):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="PaperInputsMissing") as err:
        _papermill("00-baselines", tmp_path / "00.ipynb", {"profile": "paper"}, tmp_path, monkeypatch)
    assert "needs data_dir and weights" in str(err.value)


def test_notebook_03_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """SQ Tables 2-3 and the supplement's Table 2 on ResNet-18/ImageNet, with tiny knobs (one width each,
    one seed, 6 images; the four refined models cost most of its ~120 s on 2 cores)."""
    data_dir, state = paper_inputs
    nb = _papermill("03-subset-quantization-ptq", tmp_path / "03.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "paper_models": ["resnet18/imagenet"], "supp_model": "resnet18/imagenet", "seeds": [0],
                     "w_only": [2], "w_act": [[2, 4]], "supp_options": [5], "supp_bits": 2, "calib_size": 6,
                     "n_val": 6}, tmp_path, monkeypatch)
    text = _text(nb)
    assert "resnet18/imagenet: seeds [0], test images 6, calibration 6" in text
    table2 = (tmp_path / "outputs" / "figures" / "sq_table2_weight_only.csv").read_text().splitlines()
    assert table2[0].startswith("network,method,FP,2/32") and len(table2) == 1 + 7  # the seven method rows
    assert all(r.startswith("resnet18/imagenet,") for r in table2[1:])
    table3 = (tmp_path / "outputs" / "figures" / "sq_table3_fully_quantized.csv").read_text()
    assert "2/4" in table3.splitlines()[0]
    assert "SQ Table 2 (weight-only" in text and "CPU-scale" not in text.split("sq_table2")[0][-400:]


def test_notebook_02_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """SQ's scale-factor study on torchvision ResNet-18's weights (no images needed), with tiny knobs."""
    _, state = paper_inputs
    nb = _papermill("02-scale-factor-convergence", tmp_path / "02.ipynb",
                    {"profile": "paper", "weights": {"resnet18": str(state)}, "paper_bits": [2], "paper_sample": 10,
                     "paper_winner_max_channels": 4}, tmp_path, monkeypatch)
    text = _text(nb)
    assert "resnet18/imagenet layer1.0.conv1" in text and "missing checkpoint" not in text
    census = (tmp_path / "outputs" / "figures" / "sq_convergence_census.csv").read_text()
    assert "\n2,model,19," in census  # ResNet-18's 19 SQ layers (every conv/linear but the first and last)


def test_notebook_01_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """Supplement Table 2's universal-set options on torchvision ResNet-18 with ImageNet, tiny knobs."""
    data_dir, state = paper_inputs
    nb = _papermill("01-universal-set-design", tmp_path / "01.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "options": [1, 5], "paper_bits": [2], "n_val": 4}, tmp_path, monkeypatch)
    assert "2 searches" in _text(nb)
    table = (tmp_path / "outputs" / "figures" / "sq_supp_table2_options.csv").read_text().splitlines()
    assert len(table) == 3 and all(r.startswith("resnet18/imagenet,2,") for r in table[1:])


def test_qat_command_line_trains_an_imagenet_network(paper_inputs, tmp_path, capsys, restore_imagenet_inputs):
    """`python -m lowbit.lsq resnet18 imagenet --data-dir ... --weights ...` (what torchrun launches on a
    GPU box): one epoch on the fake ImageNet, the quantized state dict saved, our errors for bad input."""
    from lowbit.lsq import __main__ as cli

    data_dir, state = paper_inputs
    out = tmp_path / "r18.pt"
    assert cli.main(["resnet18", "imagenet", "--data-dir", str(data_dir), "--weights", str(state), "--variant",
                     "nuLSQ-A", "--bits", "4", "--epochs", "1", "--batch-size", "6", "--test-n", "3",
                     "--no-augment", "--save", str(out), "--threads", "1"]) == 0
    assert "resnet18/imagenet nuLSQ-A W/A 4/4: test top-1" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert any(k.endswith("input_quantizer.steps") and v.numel() == 15 for k, v in saved.items())  # 2^4 - 1 steps
    with pytest.raises(SystemExit):
        cli.main(["resnet20", "imagenet", "--data-dir", str(data_dir), "--weights", str(state)])
    with pytest.raises(SystemExit):
        cli.main(["resnet18", "mnist"])
    with pytest.raises(FileNotFoundError, match="must hold train/ and val/"):
        cli.main(["resnet18", "imagenet", "--data-dir", str(tmp_path), "--weights", str(state)])


def test_notebook_04_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """SQ's Fig. 4 datapath with torchvision ResNet-18 on the MAC, checked on ImageNet images, tiny knobs."""
    data_dir, state = paper_inputs
    nb = _papermill("04-hardware-mac-and-cost", tmp_path / "04.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "weight_bits": 2, "n_val": 2, "n_calib": 4}, tmp_path, monkeypatch)
    text = _text(nb)
    assert f"torchvision resnet18, weights {state}: 21 layers on the MAC" in text  # 20 convs + fc
    assert "same prediction (integer MAC vs fake-quant float): 2 / 2" in text
    exact = (tmp_path / "outputs" / "figures" / "sq_hw_layer_exactness.csv").read_text().splitlines()
    assert len(exact) == 1 + 21 and all(",True," in r for r in exact[1:])
    assert "LeNet-5 check skipped" in text


def test_notebook_05_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """Q-Rater Tables 1-2 and its figures on torchvision ResNet-18 with an ImageNet objective subset,
    tiny knobs (the last layer, a coarse grid, one image per class; the runs in two worker processes)."""
    data_dir, state = paper_inputs
    nb = _papermill("05-qrater", tmp_path / "05.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "paper_bits": [4], "paper_fig_bits": 4, "paper_per_class": 1, "paper_grid": "coarse",
                     "n_val": 3, "paper_layers": [20]}, tmp_path, monkeypatch)
    text = _text(nb)
    assert "Q-Rater's ImageNet protocol, Q-Rater Table 1: resnet18 on imagenet" in text
    assert "objective on 1 training images per class" in text and "on 3 test images" in text
    table1 = (tmp_path / "outputs" / "figures" / "qrater_table1.csv").read_text().splitlines()
    assert table1[0].startswith("W/A,FP,MSE,ACIQ,KL") and table1[1].startswith("4/4,") and len(table1) == 2
    table2 = (tmp_path / "outputs" / "figures" / "qrater_table2.csv").read_text().splitlines()
    assert len(table2) == 2 and "Q-Rater BO" in table2[0]
    assert "ResNet-20 section skipped" in text
    for fig in ("qrater_fig6_rounding", "qrater_fig7_clipping", "qrater_fig8_bias_correction"):
        assert (tmp_path / "outputs" / "figures" / f"{fig}.png").exists()


def test_notebook_06_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """LSQ and the three nuLSQ variants fine-tuned from torchvision ResNet-18 on the fake ImageNet (one
    epoch over 6 images, one seed, W/A 4/4), and the torchrun line of each run for several GPUs."""
    data_dir, state = paper_inputs
    nb = _papermill("06-nulsq-training", tmp_path / "06.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "seeds": [0], "bits": [4], "paper_epochs": 1, "paper_train_n": 6, "n_val": 3, "nproc": 2},
                    tmp_path, monkeypatch)
    text = _text(nb)
    assert "nuLSQ vs LSQ on ImageNet (our protocol" in text and "CIFAR-100 ResNet-20 table: resnet18" not in text
    table = (tmp_path / "outputs" / "figures" / "nulsq_table_resnet18.csv").read_text().splitlines()
    assert table[0] == "method,4/4" and [r.split(",")[0] for r in table[1:]] == ["LSQ", "nuLSQ-A", "nuLSQ-W",
                                                                                 "nuLSQ-WA", "FP"]
    lines = [ln for ln in text.splitlines() if ln.startswith(".venv/bin/torchrun --standalone --nproc_per_node=2")]
    assert len(lines) == 4 and all(f"--data-dir {data_dir} --weights {state} --device cuda" in ln for ln in lines)
    assert all("--batch-size 128" in ln and "--train-n 6 --test-n 3" in ln for ln in lines)  # 256 / 2 per process
    from lowbit.lsq.__main__ import build_parser

    parsed = [build_parser().parse_args(shlex.split(ln)[shlex.split(ln).index("lowbit.lsq") + 1:]) for ln in lines]
    assert [(a.model, a.dataset, a.variant, a.bits, a.epochs, a.lr, a.step_lr) for a in parsed] == [
        ("resnet18", "imagenet", v, 4, 1, 0.01, 1e-4) for v in ("LSQ", "nuLSQ-A", "nuLSQ-W", "nuLSQ-WA")]
    assert "LeNet-5 / MNIST: skipped at the paper profile" in text
    levels = (tmp_path / "outputs" / "figures" / "nulsq_learned_levels_resnet18.png")
    assert levels.exists() and not (ROOT / "figures" / "nulsq_table_resnet18.csv").exists()


def test_notebook_07_paper_path_runs_end_to_end(paper_inputs, tmp_path, monkeypatch):
    """STLQ on torchvision ResNet-18 with the fake ImageNet: the three fine-tuning runs of one select ratio
    (with and without the select tensor, per tile), STLQ without training and the integer shift MAC, tiny
    knobs (one seed, one epoch over 6 images, one image through the shift MAC; ~70 s on 2 cores)."""
    data_dir, state = paper_inputs
    nb = _papermill("07-alq-stlq", tmp_path / "07.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": {"resnet18": str(state)},
                     "seeds": [0], "bits": [5], "paper_epochs": 1, "paper_train_n": 6, "n_val": 3,
                     "ptq_ratios": [0.15], "paper_ratios": [0.15], "paper_check_images": 1}, tmp_path, monkeypatch)
    text = _text(nb)
    assert "ALQ supplement's final numbers on ImageNet" in text and "CPU-scale analogue" not in text
    assert "19 STLQ layers, integer accumulators exact in every layer: True" in text
    final = (tmp_path / "outputs" / "figures" / "alq_final_top1_paper.csv").read_text().splitlines()
    assert len(final) == 1 + 3 and all(r.startswith("5/5,") for r in final[1:])
    ptq = (tmp_path / "outputs" / "figures" / "alq_ptq_paper.csv").read_text().splitlines()
    assert len(ptq) == 1 + 2 and all(r.endswith(",3") for r in ptq[1:])  # per element and per tile, 3 val images


def test_notebook_08_paper_path_reads_only_runs_on_the_same_imagenet_inputs(paper_inputs, restore_imagenet_inputs,
                                                                            tmp_path, monkeypatch):
    """Notebook 08 re-runs none of notebooks 03-07: at the paper profile it tables the ResNet-18/ImageNet
    records they made with the same data_dir and weights (planted here), and no other; the peer libraries
    it runs itself, on the same network and folder (tiny knobs: AIMET AdaRound alone, 1 step, 4 calibration images; GPTQ's adapter is the same
    path and is tested on LeNet-5)."""
    from lowbit import models, results

    data_dir, state = paper_inputs
    monkeypatch.setenv("LOWBIT_OUTPUT_DIR", str(tmp_path / "outputs"))
    imagenet.use(data_dir=str(data_dir), weights=str(state))
    same = models.imagenet_key("resnet18", "imagenet")
    for method, acc, key in (("uniform", 60.0, same), ("sq", 65.0, same), ("apot", 99.0, dict(same, imagenet_data="x"))):
        results.save_result("sq_ptq_run", dict(model="resnet18", dataset="imagenet", method=method, w_bits=4, a_bits=4,
                                               seed=0, refine=False, universal=5 if method == "sq" else None,
                                               test_size=8, **key), {"accuracy": acc, "seconds": 1.0})
    nb = _papermill("08-cross-paper", tmp_path / "08.ipynb",
                    {"profile": "paper", "data_dir": str(data_dir), "weights": str(state), "peer_methods": ["aimet-adaround"], "peer_bits": [4],
                     "peer_calib_size": 4, "peer_test_size": 8, "adaround_iterations": 1}, tmp_path, monkeypatch)
    text = _text(nb)
    table = (tmp_path / "outputs" / "figures" / "cross_paper_fully_quantized.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in table[1:]] == ["sq", "uniform"]  # apot ran on another ImageNet folder
    assert "W/A 4/4: front uniform (60.00 +- 0.00 at 1.00x) -> sq (65.00" in text
    # the peers run here, on the same network and ImageNet folder: the weight-only table has them alone
    peers = (tmp_path / "outputs" / "figures" / "cross_paper_weight_only.csv").read_text().splitlines()
    assert [r.split(",")[1:3] + r.split(",")[6:7] for r in peers[1:]] == [["4/FP", "AIMET AdaRound (1 it)", "8"]]
    assert "1 peer runs on 4 calibration images each" in text
