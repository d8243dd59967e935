"""DK-UXNet (methods.md section 2): the UX-Net + kMaX blocks at odd sizes, the hard assignment,
the losses on degenerate batches, the network x objective cross, and training on phantoms into a
bundle that the predictor and ``guidedseg segment`` use."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch.nn import functional as F

from GuidedSegLib import methods
from GuidedSegLib.methods.dkuxnet import group_cross_entropy, group_probabilities
from GuidedSegLib.methods.views import strong_view
from GuidedSegLib.networks import build_network
from GuidedSegLib.networks.kmax import KMaXDecoder, KMaXLayer, KMeansCrossAttention, hard_assignment, query_groups
from GuidedSegLib.networks.uxnet import ChannelLayerNorm, UNETRDecoder, UXBlock, UXNetEncoder
from GuidedSegLib.networks.uxnet_kmax import UXNetKMaX, pad_to_multiple
from conftest import run_until_finished
from test_objectives import CASES, K_M, check_finite, make_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = {"architecture": "uxnet-kmax", "depths": [1, 1, 1, 1], "widths": [4, 8, 8, 8], "queries": 6, "query_dim": 8,
        "layers_per_scale": 1, "heads": 2}
ODD = (17, 23, 30)


def tiny_network(classes: int = 3) -> UXNetKMaX:
    torch.manual_seed(0)
    return build_network({**TINY, "out_channels": classes})


# ----------------------------------------------------------------------------------------------
# 1. Every block at odd sizes


def test_channel_layer_norm_normalises_each_voxel_over_channels():
    x = torch.randn(2, 5, 3, 4, 7) * 3 + 1
    y = ChannelLayerNorm(5)(x)
    assert y.shape == x.shape
    assert torch.allclose(y.mean(1), torch.zeros(2, 3, 4, 7), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 3, 4, 7), atol=1e-3)


def test_ux_block_keeps_shape_and_starts_near_identity():
    x = torch.randn(1, 6, 5, 7, 9)
    block = UXBlock(6, layer_scale=1e-6)
    assert block(x).shape == x.shape
    assert torch.allclose(block(x), x, atol=1e-4)  # layer scale 1e-6: the residual branch starts tiny
    assert not torch.allclose(UXBlock(6, layer_scale=1.0)(x), x, atol=1e-2)


def test_encoder_and_decoder_shapes():
    widths = [4, 6, 8, 10]
    x = torch.randn(2, 1, 32, 48, 16)
    encoded = UXNetEncoder(1, [1, 2, 1, 1], widths)(x)
    assert [tuple(t.shape) for t in encoded] == [(2, widths[i], 32 >> (i + 1), 48 >> (i + 1), 16 >> (i + 1))
                                                 for i in range(4)]
    maps = UNETRDecoder(1, widths)(x, encoded)
    assert [tuple(t.shape) for t in maps] == [(2, 10, 4, 6, 2), (2, 8, 8, 12, 4), (2, 6, 16, 24, 8), (2, 4, 32, 48, 16)]


def test_kmax_blocks_shapes_at_odd_sizes():
    centres = torch.randn(2, 6, 8)
    decoder_map = torch.randn(2, 5, 3, 5, 7)
    assert KMeansCrossAttention(5, 8)(centres, decoder_map).shape == (2, 6, 8)
    assert KMaXLayer(5, 8, heads=2)(centres, decoder_map).shape == (2, 6, 8)
    decoder = KMaXDecoder([7, 5, 3], 4, num_classes=3, queries=6, dim=8, layers_per_scale=2, heads=2)
    maps = [torch.randn(2, 7, 2, 3, 4), torch.randn(2, 5, 3, 5, 7), torch.randn(2, 3, 5, 9, 13)]
    logits, assignment = decoder(maps, torch.randn(2, 4, 9, 17, 25))
    assert logits.shape == (2, 3, 9, 17, 25) and assignment.shape == (2, 3, 9, 17, 25)
    assert torch.allclose(assignment.sum(1), torch.ones(2, 9, 17, 25), atol=1e-5)
    assert query_groups(6).tolist() == [0, 0, 1, 1, 2, 2] and query_groups(7).tolist() == [0, 0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="cannot make 3"):
        query_groups(2)


@pytest.mark.parametrize("size", [ODD, (32, 48, 16), (9, 40, 33)])
def test_network_pads_to_16_and_crops_back(size):
    network = tiny_network().eval()
    x = torch.randn(1, 1, *size)
    padded = pad_to_multiple(x, 16, 32)
    assert all(n % 16 == 0 and n >= 32 for n in padded.shape[2:]) and padded.shape[2:] >= x.shape[2:]
    assert torch.equal(padded[:, :, :size[0], :size[1], :size[2]], x)
    with torch.no_grad():
        logits, features, assignment = network.forward_with_assignment(x)
        full, _, _ = network.forward_with_assignment(padded)
    assert logits.shape == (1, 3, *size) and features.shape == (1, 4, *size) and assignment.shape == (1, 3, *size)
    crop = full[:, :, :size[0], :size[1], :size[2]]
    assert torch.allclose(logits, crop, atol=1e-5), "the network's output is not its padded input's output cropped back"
    with torch.no_grad():
        assert torch.allclose(network(x)[0], logits, atol=1e-6)
    assert network.divisor == 16 and network.feature_channels == 4


def test_deep_supervision_heads_see_the_labels_at_their_resolution_and_cost_nothing_at_inference():
    torch.manual_seed(0)
    network = build_network({**TINY, "out_channels": 3, "deep_supervision": 2}).train()
    logits, _ = network(torch.randn(2, 1, *ODD))
    assert [tuple(d.shape) for d in network.deep_logits] == [(2, 3, 9, 12, 15), (2, 3, 5, 6, 8)]
    # L_seg reads the coarse heads: each receives a gradient from the labeled crops
    labels = torch.zeros(2, *ODD, dtype=torch.long)
    labels[:, 4:12, 5:15, 6:20] = 1
    labels[1, 10:16, 2:8, 2:9] = 2
    batch = methods.Batch(torch.randn(2, 1, *ODD), labels, torch.ones(2, 3, dtype=torch.bool),
                          torch.zeros(2, 3, dtype=torch.bool))
    torch.manual_seed(0)
    method = methods.build_method("supervised", {**TINY, "deep_supervision": 2}, 3, methods.MethodOptions(), 10)
    method(batch, 5)["total"].backward()
    for head in method.networks["A"].deep_heads:
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    network.eval()
    with torch.no_grad():
        assert network(torch.randn(1, 1, *ODD))[0].shape == (1, 3, *ODD)
    assert network.deep_logits == [] and build_network(network.config()).deep_supervision == 2
    with pytest.raises(ValueError, match="deep_supervision 4 must be in 0..3"):
        build_network({**TINY, "deep_supervision": 4})


def test_network_description_rebuilds_the_same_network():
    network = tiny_network(4)
    rebuilt = build_network(network.config())
    rebuilt.load_state_dict(network.state_dict())
    x = torch.randn(1, 1, 20, 20, 20)
    with torch.no_grad():
        assert torch.allclose(network.eval()(x)[0], rebuilt.eval()(x)[0], atol=1e-6)
    assert network.config()["architecture"] == "uxnet-kmax" and network.config()["out_channels"] == 4


# ----------------------------------------------------------------------------------------------
# 2. The hard assignment has no gradient; the centres still learn


def test_hard_assignment_is_one_hot_without_gradient():
    centres = torch.randn(2, 5, 8, requires_grad=True)
    pixels = torch.randn(2, 8, 30, requires_grad=True)
    assignment = hard_assignment(centres, pixels)
    assert not assignment.requires_grad
    assert torch.equal(assignment.sum(1), torch.ones(2, 30))
    assert torch.equal(assignment.argmax(1), torch.bmm(centres, pixels).argmax(1))


def test_cross_attention_passes_no_gradient_through_the_assignment():
    """out = centres + project(norm(assignment @ values)): with the assignment constant, d out /
    d centres is the identity of the residual alone."""
    layer = KMeansCrossAttention(5, 8)
    centres = torch.randn(2, 6, 8, requires_grad=True)
    decoder_map = torch.randn(2, 5, 3, 5, 7, requires_grad=True)
    layer(centres, decoder_map).sum().backward()
    assert torch.equal(centres.grad, torch.ones_like(centres))
    assert decoder_map.grad.abs().sum() > 0  # the assigned features carry the update's gradient


def test_centres_and_every_parameter_learn():
    network = tiny_network()
    logits, _, assignment = network.forward_with_assignment(torch.randn(2, 1, *ODD))
    labels = torch.randint(0, 3, (2, *ODD))
    (F.cross_entropy(logits, labels) + F.nll_loss(torch.log(assignment + 1e-8), labels)).backward()
    grad = network.kmax.centres.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # every parameter takes part (DDP without find_unused_parameters needs this)
    assert [n for n, p in network.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------------------------
# 3. Losses: the merged ground truth, degenerate batches


def test_group_cross_entropy_is_plain_ce_when_all_is_annotated_and_marginal_otherwise():
    labels = torch.tensor([[0, 1, 2, 3]])  # classes 2 and 3 merge into group 2
    log_a = torch.log_softmax(torch.randn(1, 3, 4), 1)
    annotated = torch.ones(1, 4, dtype=torch.bool)
    plain = F.nll_loss(log_a, labels.clamp(max=2))
    assert torch.allclose(group_cross_entropy(log_a, labels, annotated), plain)
    annotated[0, 3] = False  # class 3 unannotated: its labels read 0 (the store's convention)
    partial_labels = torch.tensor([[0, 1, 2, 0]])
    expected = -(torch.logsumexp(log_a[0, [0, 2], 0], 0) + log_a[0, 1, 1] + log_a[0, 2, 2]
                 + torch.logsumexp(log_a[0, [0, 2], 3], 0)) / 4
    assert torch.allclose(group_cross_entropy(log_a, partial_labels, annotated), expected)


def test_group_probabilities_of_a_network_without_queries():
    logits = torch.randn(2, 5, 3, 4, 4)
    groups = group_probabilities(logits)
    p = torch.softmax(logits, 1)
    assert torch.allclose(groups[:, 0], p[:, 0]) and torch.allclose(groups[:, 1], p[:, 1])
    assert torch.allclose(groups[:, 2], p[:, 2:].sum(1), atol=1e-6)


def test_strong_view_is_aligned_but_different():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 8, 12, 16)
    y = strong_view(x)
    assert y.shape == x.shape and not torch.allclose(x, y)
    assert torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1] > 0.5  # same crops, voxel for voxel


@pytest.mark.parametrize("name", ["dkuxnet", "guidednet", "guidednet-authors", "supervised"])
@pytest.mark.parametrize("case", CASES)
def test_uxnet_kmax_losses_are_finite_on_degenerate_batches(name, case):
    """test_objectives' degenerate batches (8^3 crops, padded to 32^3 inside the network)."""
    torch.manual_seed(0)
    method = methods.build_method(name, TINY, K_M, methods.MethodOptions.preset(name), 100)
    out = method(make_batch(case), 60)
    check_finite(method, out, f"{name} on uxnet-kmax, {case}")
    assert method.networks["A"].kmax.centres.grad.abs().sum() > 0
    if name == "dkuxnet":
        assert set(method.terms) == {"seg", "qd", "segc", "qdc"}
        assert all(k in out for k in ("seg", "qd", "segc", "qdc", "confident"))


def test_dual_contrastive_terms_teach_and_ramp_up():
    """With confidence 0 every pseudo-label voxel teaches, so L_segc > 0; its weight follows the ramp."""
    torch.manual_seed(0)
    options = methods.MethodOptions.preset("dkuxnet", confidence=0.0)
    method = methods.build_method("dkuxnet", TINY, K_M, options, 100)
    batch = make_batch("one_organ_and_background")
    for iteration in (0, 50, 100):
        out = method(batch, iteration)
        assert float(out["segc"]) > 0 and float(out["qdc"]) > 0 and float(out["confident"]) == 1.0
        weight = float(method.terms["segc"].detach()) / float(out["segc"])
        assert weight == pytest.approx(options.lambda_u * methods.ramp(iteration, 100, options.ramp_up), rel=1e-5)
    assert weight == pytest.approx(options.lambda_u)  # full weight at the end of the ramp


def test_the_network_and_the_objective_are_chosen_apart():
    sys.path.insert(0, str(ROOT))
    from Training.config import ConfigError, load_config

    def built(*overrides):
        config = load_config(None, list(overrides))
        method = methods.build_method(config.method, config.network_spec(), 3, config.method_options(), 10)
        return type(method).__name__, type(method.networks["A"]).__name__, config.to_dict()["network"]["type"]

    assert built("method=dkuxnet") == ("DualKMax", "UXNetKMaX", "uxnet-kmax")
    assert built("method=dkuxnet", "network.type=unet3d") == ("DualKMax", "UNet3D", "unet3d")
    assert built("method=guidednet", "network.type=uxnet-kmax") == ("GuidedNet", "UXNetKMaX", "uxnet-kmax")
    assert built("method=guidednet") == ("GuidedNet", "UNet3D", "unet3d")
    with pytest.raises(ConfigError, match="network.type 'vnet'"):
        load_config(None, ["network.type=vnet"])
    with pytest.raises(ConfigError, match="divisible by heads"):
        load_config(None, ["method=dkuxnet", "network.uxnet.query_dim=10", "network.uxnet.heads=4"])


def test_unet_under_the_dual_contrastive_objective_learns_a_batch():
    torch.manual_seed(0)
    network = {"architecture": "unet3d", "widths": [4, 8, 16], "dropout": 0.0, "feature_layer": 2}
    method = methods.build_method("dkuxnet", network, K_M, methods.MethodOptions.preset("dkuxnet"), 40)
    batch = make_batch("one_organ_and_background")
    batch.image[: batch.n_labeled] += 2.0 * batch.labels.unsqueeze(1)  # an organ the image shows
    optimiser = torch.optim.AdamW(method.parameters(), lr=0.01)
    seg = []
    for step in range(25):
        out = method(batch, step)
        optimiser.zero_grad()
        out["total"].backward()
        optimiser.step()
        seg.append(float(out["seg"]))
    assert np.mean(seg[-5:]) < 0.7 * np.mean(seg[:5]), seg


# ----------------------------------------------------------------------------------------------
# 4. Training on phantoms, a bundle, the predictor and the CLI


@pytest.fixture(scope="module")
def dkuxnet_run(three_organ_store, tmp_path_factory):
    output = tmp_path_factory.mktemp("dkuxnet-run") / "run"
    command = [sys.executable, str(ROOT / "Training" / "train.py"), "--store", str(three_organ_store),
               "--output", str(output), "--method", "dkuxnet", "--device", "cpu", "--progress", "json",
               f"data.cache={output.parent / 'cache'}", "network.uxnet.widths=[8,8,16,16]",
               "network.uxnet.depths=[1,1,1,1]", "network.uxnet.layers_per_scale=1", "network.uxnet.queries=12", "network.uxnet.query_dim=16", "network.uxnet.heads=2",
               "data.labeled_batch=2", "data.unlabeled_batch=2", "data.patch=[32,48,48]", "optim.iterations=60",
               "data.augment=false", "validation.every=1000", "validation.fraction=0", "checkpoint_every=1000",
               "gradients_every=30",
               "log_every=1"]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return output


def test_dkuxnet_trains_on_phantoms_and_lowers_its_loss(dkuxnet_run):
    with open(dkuxnet_run / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 60 and {"seg", "qd", "segc", "qdc", "confident", "total"} <= set(rows[0])
    seg = [float(r["seg"]) for r in rows]
    early, late = np.mean(seg[:10]), np.mean(seg[-10:])
    print(f"L_seg mean of the first 10 steps: {early:.3f}, of the last 10: {late:.3f}")
    assert late < 0.75 * early, f"L_seg went from {early:.3f} to only {late:.3f}"
    with open(dkuxnet_run / "gradients.csv", newline="") as handle:
        shares = list(csv.DictReader(handle))
    assert shares and {"share_seg", "share_qd", "share_segc", "share_qdc"} <= set(shares[0])


def test_dkuxnet_bundle_segments_through_the_predictor_and_the_cli(dkuxnet_run, three_organ_store, tmp_path):
    from GuidedSegLib.cli import main
    from GuidedSegLib.imageio import read_image
    from GuidedSegLib.inference import Predictor
    from GuidedSegLib.store import CaseStore

    bundle = dkuxnet_run / "bundle"
    model = json.loads((bundle / "model.json").read_text())
    assert model["method"] == "dkuxnet" and model["network"]["architecture"] == "uxnet-kmax"
    assert model["networks"] == ["A", "B"] and model["training"]["unlabeled"] == 2
    case = CaseStore(three_organ_store).cases("labeled")[0]
    image = read_image(case.image)
    label = Predictor(bundle).segment(image)
    assert label.GetSize() == image.GetSize() and label.GetSpacing() == image.GetSpacing()
    values = np.unique(sitk.GetArrayViewFromImage(label))
    print("labels segmented:", values.tolist())
    assert set(values.tolist()) <= {0, 1, 2, 3} and (values > 0).any(), "the bundle segments nothing"
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", "--model", str(bundle), "--input", str(case.image), "--output", str(out)]) == 0
    assert np.array_equal(sitk.GetArrayFromImage(read_image(out)), sitk.GetArrayFromImage(label))


def test_the_panel_lists_a_dkuxnet_bundle_and_segments_with_it(dkuxnet_run, three_organ_store, tmp_path, mrml):
    """The Slicer panel's logic (slicer-core's MRML, the real CLI in a child process) offers the
    bundle as a DK-UXNet model and puts its organs into the scene as segments."""
    import shutil

    sys.path.insert(0, str(ROOT / "GuidedSeg"))
    from GuidedSegPanel import nodes
    from GuidedSegPanel.logic import PanelLogic

    from GuidedSegLib.imageio import read_image
    from GuidedSegLib.store import CaseStore

    models = tmp_path / "models"
    shutil.copytree(dkuxnet_run / "bundle", models / "dk")
    scene, segmentations_logic = mrml
    (tmp_path / "work").mkdir()
    logic = PanelLogic(scene, segmentations_logic, python=sys.executable, work_root=tmp_path / "work")
    logic.set_models_folder(models)
    listed = logic.refresh_models()
    assert len(listed) == 1, [info.title() for info in listed]
    info = listed[0]
    assert info.usable and info.method == "dkuxnet" and "dkuxnet" in info.title(), info.title()
    assert info.networks == ("A", "B")
    case = CaseStore(three_organ_store).cases("labeled")[0]
    logic.parameters.input_volume = nodes.image_to_volume(read_image(case.image), scene, "phantom")
    logic.parameters.model = str(models / "dk")
    logic.start_segment()
    final = run_until_finished(logic, "segment", timeout=300)[-1]
    assert final.ok, final.error
    names = sorted(name for _, name in nodes.segments(final.result))
    assert names == ["kidney", "liver", "spleen"]
    volume = logic.parameters.input_volume
    voxels = {name: int(np.count_nonzero(nodes.segment_mask(final.result, sid, volume, logic.segmentations_logic,
                                                             logic.scene)))
              for sid, name in nodes.segments(final.result)}
    print("voxels per segment:", voxels)
    assert sum(voxels.values()) > 0, "the panel's segmentation is empty"


SMALL = ["--method", "dkuxnet", "--device", "cpu", "--progress", "json", "network.uxnet.widths=[4,8,8,8]",
         "network.uxnet.depths=[1,1,1,1]", "network.uxnet.layers_per_scale=1",
         "network.uxnet.queries=6", "network.uxnet.query_dim=8", "network.uxnet.heads=2", "data.patch=[32,32,32]",
         "data.labeled_batch=2", "data.unlabeled_batch=2", "validation.fraction=0", "gradients_every=0"]


def start(store: Path, output: Path, *settings: str, torchrun: int = 0) -> subprocess.Popen:
    args = [str(ROOT / "Training" / "train.py"), "--store", str(store), "--output", str(output), *SMALL,
            f"data.cache={output.parent / 'cache'}", *settings]
    prefix = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"] if torchrun else []
    return subprocess.Popen([sys.executable, *prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_dkuxnet_resumes_exactly_and_runs_under_torchrun(three_organ_store, tmp_path):
    """The strong view's random draws come from the step's seed, so a resumed run takes the
    steps an uninterrupted one takes; under DDP every parameter of both networks takes part."""
    import signal
    import time

    from test_training import losses as total_losses
    from test_training import resume_only

    settings = ["optim.iterations=4", "checkpoint_every=2"]
    reference = start(three_organ_store, tmp_path / "reference", *settings)
    assert reference.wait(600) == 0, reference.communicate()[1][-2000:]
    crashed = tmp_path / "crashed"
    process = start(three_organ_store, crashed, *settings)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (crashed / "log.csv").exists() and len(total_losses(crashed)) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    code, out, err = resume_only(crashed)
    assert code == 0, err[-2000:]
    assert "resuming" in out
    assert total_losses(crashed) == total_losses(tmp_path / "reference")

    two = start(three_organ_store, tmp_path / "two", "optim.iterations=2", torchrun=2)
    _, err = two.communicate(timeout=600)
    assert two.returncode == 0, err[-3000:]
    assert sorted(total_losses(tmp_path / "two")) == [1, 2]
    assert json.loads((tmp_path / "two" / "bundle" / "model.json").read_text())["method"] == "dkuxnet"


def test_benchmark_rows_and_table_carry_hd95(three_organ_store, tmp_path):
    """benchmark_methods' CSV has the issue's columns plus jaccard and hd95 (empty for an empty
    prediction, and for scores cached before HD95 was recorded); its table has an HD95 column."""
    sys.path.insert(0, str(ROOT / "Testing"))
    import benchmark_methods as bench
    from GuidedSegLib.store import CaseStore

    store = CaseStore(three_organ_store)
    training = {"seconds_per_iteration": 1.0, "peak_memory_mb": 100.0}
    results = {("dkuxnet", 0): ({1: [(0.8, 0.667, "a", 3.25), (0.0, 0.0, "b", float("nan"))]}, training),
               ("cps@uxnet-kmax", 0): ({1: [(0.5, 0.333, "a")]}, training)}
    path = tmp_path / "rows.csv"
    bench.write_rows(path, "la-mri", 3, results, store)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["dataset", "labeled", "method", "seed", "case", "organ", "dice", "jaccard", "hd95"]
    assert [(r["method"], r["case"], r["hd95"]) for r in rows] == [("dkuxnet", "a", "3.250"), ("dkuxnet", "b", ""),
                                                                   ("cps@uxnet-kmax", "a", "")]
    table = bench.report(results, store)
    assert "dkuxnet HD95 mm" in table and "| 3.2 ± 0.0 |" in table
    assert bench.parse_method("cps:plain@uxnet-kmax") == ("cps", True, "uxnet-kmax")
    assert bench.run_folder(tmp_path, "dkuxnet@unet3d", 1) == tmp_path / "dkuxnet-unet3d-seed1"


def test_benchmark_rows_of_one_method_keep_the_other_methods_rows_of_the_same_split(three_organ_store, tmp_path):
    """A work folder that holds only CPS's run (OpenKBP's CPS was trained apart from supervised
    and GuidedNet) rewrites CPS's rows and keeps the other methods' rows of that split."""
    sys.path.insert(0, str(ROOT / "Testing"))
    import benchmark_methods as bench
    from GuidedSegLib.store import CaseStore

    store = CaseStore(three_organ_store)
    training = {"seconds_per_iteration": 1.0, "peak_memory_mb": 100.0}
    path = tmp_path / "rows.csv"
    bench.write_rows(path, "la-mri", 3, {("supervised", 0): ({1: [(0.7, 0.5, "a", 2.0)]}, training),
                                         ("cps", 0): ({1: [(0.1, 0.05, "a", 9.0)]}, training)}, store)
    bench.write_rows(path, "la-mri", 3, {("cps", 0): ({1: [(0.8, 0.667, "a", 3.0)]}, training)}, store)
    with open(path, newline="") as handle:
        rows = sorted((r["method"], r["seed"], r["dice"]) for r in csv.DictReader(handle))
    assert rows == [("cps", "0", "0.800000"), ("supervised", "0", "0.700000")]
