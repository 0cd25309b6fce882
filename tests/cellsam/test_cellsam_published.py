"""The published CellSAM (cellsam/published.py, anchor_detr.py): its layout against the reference state dict, its
inference rules on hand-computed cases, loading and refusing checkpoint files, which parameters each stage1_type
trains, and fine-tuning through train.py into cellsam_finetuned.pt (vit_tiny in the published layout; one run at
the released vit_b size)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from skimage.exposure import equalize_adapthist, rescale_intensity

from cellsam import published
from cellsam.anchor_detr import RowColumnAttention
from cellsam.data import write_demo_dataset
from cellsam.published import (
    CellSAM,
    box_score_threshold,
    fill_holes_and_remove_small_masks,
    finder_input,
    format_image_shape,
    mask_input,
    normalize_image,
    paint_labels,
    ranked_detections,
    subtract_boundaries,
)

REPO = Path(__file__).resolve().parents[2]
# the published CellSAM's state_dict() layout (key -> shape, vanvalenlab/cellSAM at commit 35bc6e0), kept beside
# the tests so a clean clone checks it; the team's reference copy lives in ../shared/reference/
REFERENCE = Path(__file__).parent / "data" / "cellsam_published_state_dict.json"
SHARED_REFERENCE = REPO.parent / "shared" / "reference" / "cellsam_published_state_dict.json"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """A random-weight vit_tiny CellSAM in the published layout, saved as cellSAM's files are: torch.save of the
    state dict."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("published") / "tiny_cellsam.pt"
    torch.save(CellSAM("vit_tiny").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("cells"), n_images=4, size=96)


# ----------------------------------------------------------------------------------------------------------------
# The layout
# ----------------------------------------------------------------------------------------------------------------


def test_vit_b_state_dict_has_every_published_key_and_shape():
    reference = json.loads(REFERENCE.read_text())
    if SHARED_REFERENCE.is_file():
        assert json.loads(SHARED_REFERENCE.read_text()) == reference
    with torch.device("meta"):
        model = CellSAM("vit_b")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert reference["count"] == len(ours) == 1041
    assert ours == reference["keys"] and list(ours) == list(reference["keys"])


def test_class_and_box_heads_are_one_module_per_kind_as_anchor_detr():
    model = CellSAM("vit_tiny")
    transformer = model.cellfinder.decode_head.transformer
    assert len(transformer.class_embed) == 2 and transformer.class_embed[0] is transformer.class_embed[1]
    assert transformer.bbox_embed[0] is transformer.bbox_embed[1]
    # the backbone is CellFinder's own encoder, not model_cp's nor model's
    body = model.cellfinder.decode_head.backbone.body
    assert body.blocks[0].attn.qkv.weight is not model.model_cp.image_encoder.blocks[0].attn.qkv.weight
    assert not hasattr(body, "neck")


@pytest.mark.parametrize("h, w", [(3, 5), (5, 3), (4, 4)])
def test_row_column_attention_equals_its_formula(h, w):
    """out(q) = W_o sum_{h,w} softmax_h(q_col . mean_w k_col) softmax_w(q_row . mean_h k_row) v(h, w), per head."""
    torch.manual_seed(1)
    b, length, dim, heads = 2, 7, 16, 4
    attention = RowColumnAttention(dim, heads)
    torch.nn.init.normal_(attention.in_proj_bias)
    q_row, q_col = torch.randn(b, length, dim), torch.randn(b, length, dim)
    k_row, k_col, value = torch.randn(b, h, w, dim), torch.randn(b, h, w, dim), torch.randn(b, h, w, dim)
    got = attention(q_row, q_col, k_row, k_col, value)
    wq_r, wq_c, wk_r, wk_c, wv = attention.in_proj_weight.chunk(5)
    bq_r, bq_c, bk_r, bk_c, bv = attention.in_proj_bias.chunk(5)
    d = dim // heads

    def heads_of(x):  # (..., dim) -> (..., heads, d)
        return x.reshape(*x.shape[:-1], heads, d)

    qr, qc = heads_of(q_row @ wq_r.T + bq_r) / d**0.5, heads_of(q_col @ wq_c.T + bq_c) / d**0.5
    kr = heads_of((k_row @ wk_r.T + bk_r).mean(1))  # (b, w, heads, d)
    kc = heads_of((k_col @ wk_c.T + bk_c).mean(2))  # (b, h, heads, d)
    v = heads_of(value @ wv.T + bv)  # (b, h, w, heads, d)
    a_row = torch.einsum("bqnd,bwnd->bnqw", qr, kr).softmax(-1)
    a_col = torch.einsum("bqnd,bhnd->bnqh", qc, kc).softmax(-1)
    expected = torch.einsum("bnqh,bnqw,bhwnd->bqnd", a_col, a_row, v).reshape(b, length, dim)
    expected = attention.out_proj(expected)
    assert torch.allclose(got, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Inference rules, hand-computed
# ----------------------------------------------------------------------------------------------------------------


def test_k_means_threshold_on_a_known_score_list():
    # two clusters: centres (0.9 + 0.8 + 0.85) / 3 = 0.85 and (0.1 + 0.05 + 0.12) / 3 = 0.09, mean 0.47:
    # 0.66 x 0.4 + 0.33 x 0.47 = 0.4191
    scores = np.array([0.9, 0.1, 0.8, 0.05, 0.85, 0.12])
    assert box_score_threshold(scores, 0.4) == pytest.approx(0.4191, abs=1e-6)
    assert box_score_threshold(scores, 0.2) == pytest.approx(0.66 * 0.2 + 0.33 * 0.47, abs=1e-6)
    assert box_score_threshold(np.array([0.7]), 0.4) == 0.4  # one score: the fixed threshold
    # all equal: both centres are that score
    assert box_score_threshold(np.full(10, 0.3), 0.4) == pytest.approx(0.66 * 0.4 + 0.33 * 0.3, abs=1e-6)


def test_detections_are_the_best_scores_of_every_query_and_class():
    logits = torch.logit(torch.tensor([[[0.2, 0.7], [0.9, 0.1], [0.3, 0.05]]]))  # 3 queries, 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.1, 0.9, 0.2, 0.2]]])
    scores, xyxy = ranked_detections({"pred_logits": logits, "pred_boxes": boxes}, 100)
    # the 3 (= queries) best of the 6 scores: query 1 (0.9), query 0 (0.7), query 2 (0.3)
    assert torch.allclose(scores, torch.tensor([0.9, 0.7, 0.3]), atol=1e-6)
    assert torch.allclose(xyxy[0], torch.tensor([0.0, 0, 50, 50]))
    assert torch.allclose(xyxy[1], torch.tensor([40.0, 30, 60, 70]))
    assert torch.allclose(xyxy[2], torch.tensor([0.0, 80, 20, 100]))
    kept = published.select_boxes(scores, xyxy, 0.4)  # k-means centres 0.8 and 0.3: 0.264 + 0.33 x 0.55 = 0.4455
    assert torch.equal(kept, xyxy[:2])
    # both classes of one query can rank: query 0's other class (0.75) beats query 2
    logits[0, 0, 0] = torch.logit(torch.tensor(0.75))
    scores, _, queries = ranked_detections({"pred_logits": logits, "pred_boxes": boxes}, 100, with_queries=True)
    assert queries.tolist() == [1, 0, 0] and torch.allclose(scores, torch.tensor([0.9, 0.75, 0.7]))


def test_a_later_mask_wins_the_pixels_two_masks_claim():
    a, b = np.zeros((4, 5), bool), np.zeros((4, 5), bool)
    a[0:3, 0:3], b[1:4, 2:5] = True, True
    labels = paint_labels([a, b], (4, 5))
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2], [1, 1, 2, 2, 2], [0, 0, 2, 2, 2]])
    assert np.array_equal(labels, expected)


def test_masks_below_the_iou_threshold_are_dropped_and_the_rest_numbered_in_box_order(monkeypatch):
    """Three box prompts with predicted IoU 0.9, 0.49 and 0.5: the second is dropped (cellSAM keeps IoU >= 0.5),
    the others are numbered 1 and 2, and the third (later) wins where it overlaps the first."""
    model = CellSAM("vit_tiny").eval()
    low = torch.full((3, 64, 64), -10.0)  # SAM's low-resolution masks: the input size / 4
    low[0, 8:40, 8:40] = low[1, 0:16, 0:16] = low[2, 30:60, 30:60] = 10.0

    def decode(sam, embedding, boxes):
        return low[: len(boxes)], torch.tensor([0.9, 0.49, 0.5])[: len(boxes)]

    monkeypatch.setattr(published, "decode_masks", decode)
    image = np.zeros((128, 128, 3))
    boxes = [[10, 10, 80, 80], [0, 0, 30, 30], [60, 60, 120, 120]]
    labels, _, kept, _ = published.predict(model, image, boxes)
    assert np.array_equal(kept, np.array(boxes, np.float32)[[0, 2]])
    assert set(np.unique(labels)) == {0, 1, 2}
    # 64 px low-res -> 256 px input -> 128 px image: low-res pixel p covers image pixels 2p .. 2p + 1
    assert labels[40, 40] == 1 and labels[70, 70] == 2 and labels[62, 62] == 2  # overlap 60..79: the later mask
    assert labels[5, 5] == 0  # the dropped mask drew nothing


def test_holes_filled_small_cells_removed_and_renumbered():
    labels = np.zeros((12, 12), np.int32)
    labels[1:8, 1:8] = 3
    labels[3:5, 3:5] = 0  # a hole in cell 3
    labels[9:12, 9:12] = 5  # 9 px: removed at min_size 25
    labels[0:6, 9:12] = 7  # 18 px
    out = fill_holes_and_remove_small_masks(labels.copy(), min_size=15)
    assert out[3, 3] == 1 and (out == 1).sum() == 49  # hole filled, renumbered 1
    assert (out == 2).sum() == 18 and not (out == 5).any() and out[10, 10] == 0


def test_subtract_boundaries_zeroes_one_pixel_between_cells():
    labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0]])
    # a pixel goes where its left neighbour or its lower neighbour differs
    expected = np.array([[1, 1, 0, 2], [0, 0, 0, 0], [0, 0, 0, 0]])  # (0, 2): left differs; row 1: below differs
    assert np.array_equal(subtract_boundaries(labels), expected)


def test_format_image_shape_puts_channels_last_in_the_last_slots():
    grey = np.arange(12.0).reshape(3, 4)
    assert np.array_equal(format_image_shape(grey)[..., 2], grey) and not format_image_shape(grey)[..., :2].any()
    two = np.stack([grey, grey + 1])  # channels first
    out = format_image_shape(two)
    assert out.shape == (3, 4, 3) and np.array_equal(out[..., 1], grey) and np.array_equal(out[..., 2], grey + 1)
    with pytest.raises(ValueError, match="at most three channels"):
        format_image_shape(np.zeros((5, 5, 4)))


def test_normalize_image_is_percentile_clip_then_clahe_per_channel():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (64, 64)).astype(np.float64)
    image[0, 0] = 60000  # a hot pixel above the 99.9th percentile
    out = normalize_image(image)
    clipped = np.minimum(image, np.percentile(image[image != 0], 99.9))
    expected = equalize_adapthist(rescale_intensity(clipped, out_range=(0.0, 1.0)), kernel_size=128)
    assert np.allclose(out[..., 2], expected) and not out[..., :2].any()


def test_finder_input_min_max_per_channel_and_empty_green_filled():
    sam = CellSAM("vit_tiny").model
    image = torch.zeros(1, 3, 8, 8)
    image[0, 2] = torch.linspace(0, 1, 64).reshape(8, 8)  # grey in the last slot
    x = finder_input(image, sam)
    assert torch.allclose(x[0, 2].amax(), torch.tensor(1.0), atol=1e-4) and x[0, 2].amin() == 0
    assert torch.equal(x[0, 1], x[0, 2]) and not x[0, 0].any()  # the empty green channel took the blue one


def test_mask_input_clips_to_the_non_zero_percentiles():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((1, 3, 16, 16)).astype(np.float32))
    image[0, 0] = 0
    x = mask_input(image, adv_mode=False) / 255
    values = image[image != 0].numpy()
    low, high = np.percentile(values, [0, 99.5])
    expected = rescale_intensity(image.numpy(), in_range=(low, high), out_range="float32")
    assert np.allclose(x.numpy(), expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Loading, refusing, exporting
# ----------------------------------------------------------------------------------------------------------------


def test_a_published_file_loads_strictly_and_exports_the_same_keys(tiny_file, tmp_path):
    model = CellSAM("vit_tiny")
    published.load_cellsam_weights(model, tiny_file)
    saved = torch.load(tiny_file, weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    out = published.save_published(model, tmp_path / "back.pt")
    again = torch.load(out, weights_only=True)
    assert list(again) == list(saved) and all(again[k].shape == saved[k].shape for k in saved)
    CellSAM("vit_tiny").load_state_dict(again, strict=True)


def test_get_local_model_lists_what_a_file_lacks(tiny_file, tmp_path):
    state = torch.load(tiny_file, weights_only=True)
    partial = {k: v for k, v in state.items() if "adapt_pos1d" not in k}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.warns(
        UserWarning, match=r"lacks 4 key\(s\), left as built: cellfinder.decode_head.transformer.adapt_pos1d"
    ):
        model = published.get_local_model(tmp_path / "partial.pt", sam_size="vit_tiny")
    assert not model.training


def test_an_official_sam_file_starts_all_three_encoders(tmp_path):
    from cellsam.model import build_sam

    torch.manual_seed(3)
    sam = build_sam("vit_tiny")
    torch.save(sam.state_dict(), tmp_path / "sam_tiny.pth")
    model = CellSAM("vit_tiny", sam_checkpoint=tmp_path / "sam_tiny.pth")
    weight = sam.image_encoder.blocks[0].attn.qkv.weight
    for encoder in (
        model.model.image_encoder,
        model.model_cp.image_encoder,
        model.cellfinder.decode_head.backbone.body,
    ):
        assert torch.equal(encoder.blocks[0].attn.qkv.weight, weight)
    assert torch.equal(model.model_cp.mask_decoder.iou_token.weight, sam.mask_decoder.iou_token.weight)


def test_released_names_resolve_to_cellsams_cache_with_an_offline_message(monkeypatch, tmp_path, tiny_file):
    import cellsam

    monkeypatch.setattr(published, "CACHE", tmp_path / "models")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded here"):
        cellsam.get_model("cellsam_general")
    (tmp_path / "models" / "cellsam_v1.2").mkdir(parents=True)
    (tmp_path / "models" / "cellsam_v1.2" / "cellsam_extra.pt").write_bytes(tiny_file.read_bytes())
    model = CellSAM("vit_tiny")
    published.load_cellsam_weights(model, "cellsam_extra", log=lambda *_: None)
    assert torch.equal(model.model.mask_decoder.iou_token.weight,
                       torch.load(tiny_file, weights_only=True)["model.mask_decoder.iou_token.weight"])  # fmt: skip


def test_a_file_without_model_cp_takes_it_from_model(tiny_file, tmp_path):
    state = torch.load(tiny_file, weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("model_cp.")}, tmp_path / "no_cp.pt")
    model = CellSAM("vit_tiny")
    notes = []
    published.load_cellsam_weights(model, tmp_path / "no_cp.pt", log=notes.append)
    assert not model.adv_mode and model.mask_sam is model.model and "no model_cp" in notes[0]
    assert torch.equal(model.model_cp.mask_decoder.iou_token.weight, state["model.mask_decoder.iou_token.weight"])
    # trained so (the masks' parts are model's), and exported so: cellSAM runs the result without model_cp too
    assert model.stage2_parts("neck")[0] == [model.model.image_encoder.neck]
    exported = torch.load(published.save_published(model, tmp_path / "out.pt"), weights_only=True)
    assert set(exported) == {k for k in state if not k.startswith("model_cp.")}


def bad_files(tmp_path, tiny_file):
    state = torch.load(tiny_file, weights_only=True)
    official = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 3])
    files = {
        "official_sam.pth": (official, "an official SAM checkpoint \\(vit_tiny\\): give it as --sam_checkpoint"),
        "stage.pth": ({"domain": "cellsam", "stage": 2, "modules": {}}, "a stage checkpoint of cellsam/train.py"),
        "random.pt": ({"weights": torch.zeros(3), "bias": torch.ones(2)}, "no CellSAM or SAM layout"),
        "extra.pt": ({**state, "model.extra_head.weight": torch.zeros(2)}, "1 key\\(s\\) outside the published"),
        "missing.pt": ({k: v for k, v in state.items() if "class_embed" not in k}, "lacks 4 of the"),
    }
    for name, (content, _) in files.items():
        torch.save(content, tmp_path / name)
    return {tmp_path / n: m for n, (_, m) in files.items()} | {cut: "not a readable PyTorch checkpoint"}


def test_bad_checkpoints_name_the_file_and_what_they_hold(tmp_path, tiny_file):
    for path, message in bad_files(tmp_path, tiny_file).items():
        with pytest.raises(SystemExit, match=message) as error:
            published.load_cellsam_weights(CellSAM("vit_tiny"), path)
        assert str(path) in str(error.value)
    # a vit_tiny file given to the released size
    with pytest.raises(
        SystemExit, match="holds a CellSAM in the published layout \\(vit_tiny image encoders\\), not vit_b"
    ):
        published.check_cellsam_checkpoint(tiny_file, "vit_b")


def test_a_published_file_given_as_a_sam_checkpoint_says_which_flag_takes_it(tiny_file):
    from cellsam.model import build_sam

    with pytest.raises(
        SystemExit, match="published layout \\(vit_tiny image encoders\\): give it as --cellsam_checkpoint"
    ):
        build_sam("vit_tiny", checkpoint=tiny_file)


def test_train_refuses_a_bad_checkpoint_before_writing_anything(tmp_path, tiny_file, data):
    from cellsam import train

    for path, message in bad_files(tmp_path, tiny_file).items():
        out = tmp_path / f"out_{path.stem}"
        argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(out),
                "--architecture", "published", "--sam_size", "vit_tiny", "--cellsam_checkpoint", str(path)]  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            train.main(train.get_args_parser().parse_args(argv))
        assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# Training: what each stage1_type trains, and a whole fine-tuning run
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage1_type", ["cellfinder", "image_encoder", "all_backbones"])
def test_each_stage1_type_changes_which_parameters_get_gradients(stage1_type, data):
    from cellsam import train
    from cellsam.config import Stage2Config
    from cellsam.data import CellDataset, collate, find_pairs, xyxy_to_cxcywh
    from cellsam.model import MaskLoss, SetCriterion

    torch.manual_seed(0)
    model = CellSAM("vit_tiny")
    model.freeze_for_stage1(stage1_type)
    dataset = CellDataset(find_pairs(data / "images", data / "masks")[:2], 256, reader=model.read_image,
                          resize_small=True)  # fmt: skip
    batch = collate([dataset[0], dataset[1]])
    targets = [xyxy_to_cxcywh(b, 256, 256) for b in batch["boxes"]]
    joint = stage1_type == "all_backbones"
    s2 = Stage2Config(max_prompts=4)
    prompts, truths = train.sample_prompts(batch, s2, np.random.default_rng(0), True, "cpu") if joint else (None, None)
    out = train.Stage1Net(model)(batch["image"], prompts)
    loss, _ = SetCriterion()(out, targets)
    if joint:
        loss = loss + torch.stack(train.mask_loss_terms(out["masks"], truths, prompts, 256, MaskLoss(), s2, {})).mean()
    loss.backward()

    def moved(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    head = model.cellfinder.decode_head
    assert moved(head.transformer) and moved(head.input_proj)
    assert moved(head.backbone.body) == (stage1_type != "cellfinder")
    assert moved(model.model_cp.image_encoder.blocks) == joint and moved(model.model_cp.image_encoder.neck) == joint
    assert (
        not moved(model.model) and not moved(model.model_cp.mask_decoder) and not moved(model.model_cp.prompt_encoder)
    )


def test_fine_tune_a_published_file_and_get_it_back_in_its_layout(tmp_path, tiny_file, data):
    """train.py --cellsam_checkpoint: --preeval scores the loaded model, both stages train, and
    models/fold_1/cellsam_finetuned.pt holds the published keys and shapes, loads strictly, and is what
    evaluate.py scores."""
    from cellsam import evaluate, train, visualize

    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path),
            "--output_name", "tuned", "--architecture", "published", "--sam_size", "vit_tiny", "--cellsam_checkpoint",
            str(tiny_file), "--total_epochs_s1", "2", "--total_epochs_s2", "1", "--num_workers", "0", "--preeval",
            "--max_prompts", "4", "--val_fraction", "0.25"]  # fmt: skip
    result = train.main(train.get_args_parser().parse_args(argv))
    root = Path(result["output_dir"])
    exported = root / "models" / "fold_1" / "cellsam_finetuned.pt"
    state, original = torch.load(exported, weights_only=True), torch.load(tiny_file, weights_only=True)
    assert list(state) == list(original) and all(state[k].shape == original[k].shape for k in original)
    CellSAM("vit_tiny").load_state_dict(state, strict=True)
    # stage 1 moved CellFinder's transformer, stage 2 model_cp's neck; CellFinder's own encoder stayed
    key = "cellfinder.decode_head.transformer.decoder_layers.0.ffn.linear1.weight"
    assert not torch.equal(state[key], original[key])
    assert not torch.equal(
        state["model_cp.image_encoder.neck.0.weight"], original["model_cp.image_encoder.neck.0.weight"]
    )
    body = "cellfinder.decode_head.backbone.body.blocks.0.attn.qkv.weight"
    assert torch.equal(state[body], original[body])
    aggregated = json.loads((root / "results" / "aggregated_results.json").read_text())["metrics"]
    assert {"f1", "before_f1", "baseline_f1"} <= set(aggregated)
    folds = json.loads((root / "results" / "individual_results.json").read_text())
    assert folds[0]["before_training"]["f1"] == aggregated["before_f1"]["mean"]
    # evaluate.py scores the exported model, from the experiment or from the file itself
    out = evaluate.main(evaluate.get_args_parser().parse_args([str(root)]))
    report = json.loads((out / "report.json").read_text())
    assert report["image_names"] == folds[0]["val_images"]
    again = evaluate.main(evaluate.get_args_parser().parse_args(
        ["--cellsam_checkpoint", str(exported), "--sam_size", "vit_tiny", "--images", str(data / "images"),
         "--masks", str(data / "masks"), "--output_dir", str(tmp_path / "direct")]))  # fmt: skip
    assert len(list((again / "labels").glob("*.tif"))) == 4
    figures = [visualize.main(visualize.get_args_parser().parse_args([kind, str(root), "--n", "1"]))
               for kind in ("boxes", "masks")]  # fmt: skip
    assert all(p.is_file() for p in figures)


@pytest.mark.skipif(sys.platform == "win32", reason="1.1 GB of random weights")
def test_released_size_random_file_fine_tunes_one_step_per_stage_and_segments(tmp_path):
    """The Done-when of the issue at the released size: a random-weight vit_b CellSAM saved with torch.save loads
    strictly, fine-tunes one step per stage on the CPU (one 64 px image, resized to 1024 px), comes back as
    cellsam_finetuned.pt with the same keys and shapes, and runs segment_cellular_image (with given boxes:
    random weights find no cells)."""
    from cellsam import train

    data = write_demo_dataset(tmp_path / "data", n_images=1, size=64)
    torch.manual_seed(0)
    start = tmp_path / "random_vit_b.pt"
    torch.save(CellSAM("vit_b").state_dict(), start)
    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path),
            "--cellsam_checkpoint", str(start), "--strategy", "full_dataset", "--total_epochs_s1", "1",
            "--total_epochs_s2", "1", "--batch_size", "1", "--no-figures",
            "--num_workers", "0", "--max_prompts", "2", "--cell_class", "1"]  # fmt: skip
    root = Path(train.main(train.get_args_parser().parse_args(argv))["output_dir"])
    exported = torch.load(root / "models" / "fold_1" / "cellsam_finetuned.pt", weights_only=True)
    original = torch.load(start, weights_only=True)
    assert len(exported) == 1041 and all(exported[k].shape == original[k].shape for k in original)
    model = CellSAM("vit_b")
    model.load_state_dict(exported, strict=True)
    # random weights predict a low IoU and a faint mask: keep every mask and every pixel of it
    model.iou_threshold, model.mask_threshold = -1.0, 0.0
    image = np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)
    mask, embedding, boxes = published.segment_cellular_image(image, model, bounding_boxes=[[8, 8, 40, 40]])
    assert mask.shape == (64, 64) and mask.dtype == np.int32 and mask.max() == 1
    assert embedding.shape == (1, 256, 64, 64) and np.allclose(boxes, [[8, 8, 40, 40]])


def test_torchrun_fine_tunes_the_published_layout_on_two_cpu_processes(tmp_path, tiny_file, data):
    """DDP (gloo) with stage1_type all_backbones: CellFinder's box loss and model_cp's mask loss in one step; the
    first process alone writes the folder and cellsam_finetuned.pt."""
    import os
    import subprocess

    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path),
            "--output_name", "ddp", "--architecture", "published", "--sam_size", "vit_tiny", "--cellsam_checkpoint",
            str(tiny_file), "--stage1_type", "all_backbones", "--total_epochs_s1", "1", "--total_epochs_s2", "1",
            "--num_workers", "0", "--max_prompts", "4", "--batch_size", "1"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(REPO / "cellsam" / "train.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]
    root = tmp_path / "ddp"
    assert "x 2 process(es)" in (root / "logs" / "experiment.log").read_text()
    state, original = (
        torch.load(p, weights_only=True) for p in (root / "models/fold_1/cellsam_finetuned.pt", tiny_file)
    )
    key = "model_cp.image_encoder.blocks.0.attn.qkv.weight"  # all_backbones: the masks' encoder moved in stage 1
    assert not torch.equal(state[key], original[key])


def test_resume_after_a_kill_in_stage_2_keeps_stage_1_and_exports(tmp_path, tiny_file, data, monkeypatch):
    """Killed during stage 2: --resume restores stage 1 from its checkpoints (the trained parts only, not the
    frozen encoders, which come from the starting file again), finishes stage 2 and writes cellsam_finetuned.pt."""
    from cellsam import train

    argv = ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(tmp_path),
            "--output_name", "killed", "--architecture", "published", "--sam_size", "vit_tiny", "--cellsam_checkpoint",
            str(tiny_file), "--total_epochs_s1", "2", "--total_epochs_s2", "2", "--num_workers", "0",
            "--max_prompts", "4"]  # fmt: skip
    original_fit = train.fit

    def killed_in_stage_2(stage, run_epoch, *rest):
        if stage == 2:
            raise KeyboardInterrupt("killed")
        return original_fit(stage, run_epoch, *rest)

    monkeypatch.setattr(train, "fit", killed_in_stage_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.get_args_parser().parse_args(argv))
    root = tmp_path / "killed"
    stage1 = torch.load(root / "models" / "fold_1" / "best_model_s1.pth", weights_only=True)["modules"]
    assert set(stage1) == {"cellfinder.transformer", "cellfinder.input_proj"}  # stage1_type cellfinder
    monkeypatch.setattr(train, "fit", original_fit)
    train.main(train.get_args_parser().parse_args(["--resume", str(root)]))
    exported = torch.load(root / "models" / "fold_1" / "cellsam_finetuned.pt", weights_only=True)
    for name, value in stage1["cellfinder.transformer"].items():
        assert torch.equal(exported[f"cellfinder.decode_head.transformer.{name}"], value), name
    assert set(torch.load(root / "models" / "fold_1" / "best_model_s2.pth", weights_only=True)["modules"]) == {
        "mask_sam.neck", "mask_sam.prompt_encoder", "mask_sam.mask_decoder"}  # fmt: skip


def test_published_training_samples_fit_the_window_as_inference_does(tiny_file, data):
    """An image that fits the window is resized whole to the input size; a larger one gives crops of the window,
    resized to the input size (the scale evaluate.py's windows see)."""
    from cellsam.data import CellDataset, find_pairs

    model = CellSAM("vit_tiny")
    pairs = find_pairs(data / "images", data / "masks")[:1]  # 96 px images
    whole = CellDataset(pairs, 256, reader=model.read_image, resize_small=True)[0]
    cropped = CellDataset(pairs, 256, reader=model.read_image, resize_small=True, window=64)[0]
    assert whole["image"].shape == cropped["image"].shape == (3, 256, 256)
    truth = np.asarray(whole["mask"])
    cells = len(np.unique(truth)) - 1
    assert 0 < len(np.unique(np.asarray(cropped["mask"]))) - 1 <= cells  # a 64 px crop holds fewer cells
    # resized whole: each cell 256 / 96 times as wide as on disk
    from cellsam.data import read_mask

    on_disk = read_mask(pairs[0].mask)
    ratio = (truth > 0).sum() / (on_disk > 0).sum()
    assert ratio == pytest.approx((256 / 96) ** 2, rel=0.05)
    from cellsam import train

    argv = ["--img_path", "i", "--mask_path", "m", "--window", "512"]
    assert train.config_from_args(train.get_args_parser().parse_args(argv)).window == 512


def test_prompts_pair_each_box_with_its_own_cell_when_a_crop_has_no_background():
    """A confluent crop (no label 0): box k must prompt for cell k's mask (np.unique(mask)[1:] once dropped the
    first cell and paired every box with the next cell's mask)."""
    from cellsam import train
    from cellsam.config import Stage2Config
    from cellsam.data import boxes_from_mask

    mask = np.zeros((8, 8), np.int64)
    mask[:, :3], mask[:, 3:6], mask[:, 6:] = 4, 7, 9  # three cells, no background
    _, boxes = boxes_from_mask(mask)
    batch = {"image": torch.zeros(1, 3, 8, 8), "mask": torch.from_numpy(mask)[None], "boxes": [torch.from_numpy(boxes)]}
    prompts, truths = train.sample_prompts(batch, Stage2Config(box_jitter=0.0), np.random.default_rng(0), True, "cpu")
    for box, truth in zip(prompts[0], truths[0], strict=True):
        ys, xs = np.nonzero(truth.numpy())
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()


def tiny_argv(data: Path, out: Path, *more: str) -> list[str]:
    """This folder's tiny shared-encoder model, one epoch per stage."""
    return ["--img_path", str(data / "images"), "--mask_path", str(data / "masks"), "--output_dir", str(out),
            "--sam_size", "vit_tiny", "--num_workers", "0", "--hidden", "32", "--heads", "2", "--encoder_layers",
            "1", "--decoder_layers", "1", "--anchor_grid", "4", "--patterns", "1", "--max_prompts", "2",
            *more]  # fmt: skip


def test_validation_prompts_are_the_same_cells_every_epoch(tmp_path, data, monkeypatch):
    """Early stopping compares validation losses across epochs: each validation pass prompts the same cells (they
    were drawn from the training stream, so every epoch scored another random subset)."""
    from cellsam import train

    seen, original = [], train.sample_prompts

    def recording(batch, s2, rng, is_train, device):
        prompts, truths = original(batch, s2, rng, is_train, device)
        if not is_train:
            seen.append([None if p is None else p.tolist() for p in prompts])
        return prompts, truths

    monkeypatch.setattr(train, "sample_prompts", recording)
    argv = tiny_argv(data, tmp_path, "--total_epochs_s1", "1", "--total_epochs_s2", "3", "--val_fraction", "0.5")
    train.main(train.get_args_parser().parse_args(argv))
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]


def test_no_mixed_precision_is_read(tmp_path, data, monkeypatch):
    from cellsam import train

    calls, original = [], train.amp
    monkeypatch.setattr(train, "amp", lambda device, enabled=True: calls.append(enabled) or original(device, enabled))
    argv = tiny_argv(data, tmp_path, "--total_epochs_s1", "1", "--total_epochs_s2", "1", "--strategy", "full_dataset")
    train.main(train.get_args_parser().parse_args([*argv, "--no-mixed_precision"]))
    assert calls and not any(calls)


def test_a_mask_without_an_image_and_too_few_images_are_clear_errors(tmp_path, data):
    import shutil

    from cellsam import train

    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    (copy / "images" / "img_0001.tif").unlink()
    with pytest.raises(SystemExit, match="1 mask\\(s\\) without an image in .*img_0001.png"):
        train.main(train.get_args_parser().parse_args(tiny_argv(copy, tmp_path / "a")))
    one = tmp_path / "one"
    for kind in ("images", "masks"):
        (one / kind).mkdir(parents=True)
        shutil.copy(next((data / kind).glob("img_0002.*")), one / kind)
    with pytest.raises(SystemExit, match="train_val_split needs at least 2 images .* holds 1"):
        train.main(train.get_args_parser().parse_args(tiny_argv(one, tmp_path / "b")))
    with pytest.raises(SystemExit, match="--k_folds 5 needs at least 5 images"):
        train.main(train.get_args_parser().parse_args(tiny_argv(data, tmp_path / "c", "--strategy", "k_fold")))
    assert not any((tmp_path / n).exists() for n in "abc")


def test_export_writes_three_graphs_that_onnxruntime_runs_as_pytorch(tiny_file, data, tmp_path):
    """evaluate.py --cellsam_checkpoint FILE --export DIR: cellfinder, image_encoder and mask_decoder, each run
    with onnxruntime on a real image prepared as model.json says, give the PyTorch model's numbers."""
    import onnxruntime

    from cellsam import evaluate as cellsam_evaluate
    from cellsam.model import decode_masks
    from cellsam.published import finder_input, mask_input, resize_to_input

    argv = ["--cellsam_checkpoint", str(tiny_file), "--sam_size", "vit_tiny", "--export", str(tmp_path / "x")]
    out = cellsam_evaluate.main(cellsam_evaluate.get_args_parser().parse_args(argv))
    spec = json.loads((out / "model.json").read_text())
    assert sorted(spec["graphs"]) == ["cellfinder", "image_encoder", "mask_decoder"] and len(spec["pipeline"]) == 4
    assert all(g["checked"]["onnxruntime_max_abs_difference"] <= 1e-4 for g in spec["graphs"].values())
    model = CellSAM("vit_tiny")
    published.load_cellsam_weights(model, tiny_file, log=lambda *_: None)
    model.eval()
    image = model.read_image(sorted((data / "images").iterdir())[0])
    x = resize_to_input(torch.from_numpy(image.transpose(2, 0, 1).copy())[None], model.input_size)

    def run(name, **feeds):
        session = onnxruntime.InferenceSession(str(out / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        return session.run(None, {k: v.numpy() for k, v in feeds.items()})

    with torch.no_grad():
        scores, boxes = run("cellfinder", image=x)
        expected = model.cellfinder(finder_input(x / 255, model.model, model.adv_mode))
        assert np.abs(scores - expected["pred_logits"].sigmoid().numpy()).max() <= 1e-4
        assert np.abs(boxes - expected["pred_boxes"].numpy()).max() <= 1e-4
        prepared = mask_input(x / 255, model.adv_mode)
        (embedding,) = run("image_encoder", image=prepared)
        sam = model.mask_sam
        reference = sam.image_encoder((prepared - sam.pixel_mean) / sam.pixel_std)
        assert np.abs(embedding - reference.numpy()).max() <= 1e-4
        prompts = torch.tensor([[4.0, 4.0, 60.0, 50.0], [70.0, 80.0, 200.0, 210.0], [0.0, 0.0, 255.0, 255.0]])
        masks, iou = run("mask_decoder", embedding=reference, boxes=prompts)  # three boxes: the count is free
        logits, expected_iou = decode_masks(sam, reference, prompts)
        assert masks.shape == tuple(logits.shape) and np.abs(masks - logits.sigmoid().numpy()).max() <= 1e-4
        assert np.abs(iou - expected_iou.numpy()).max() <= 1e-4


def test_a_large_tiff_is_segmented_a_window_at_a_time_as_whole(tiny_file, tmp_path, monkeypatch):
    """evaluate.py on a TIFF past data.IN_MEMORY_PX: read a window at a time (tifffile's zarr view), normalised
    with the whole image's statistics from a strided sample, cells stitched into labels/<name>.ome.zarr with
    cells/ and geojson/ written as found; with a per-window stand-in for the pipeline (bright pixels are cells)
    the cells are the ones the image read whole gives, each once."""
    import tifffile
    import zarr
    from skimage.measure import label

    import cellsam.data as cellsam_data
    from cellsam import evaluate as cellsam_evaluate

    rng = np.random.default_rng(4)
    image = rng.normal(300, 10, (700, 900)).astype(np.uint16)
    yy, xx = np.mgrid[:700, :900]
    for y in range(25, 680, 45):
        for x in range(25, 880, 45):
            cy, cx, r = y + rng.uniform(-5, 5), x + rng.uniform(-5, 5), rng.uniform(6, 12)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r**2] = 4000
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "plate.tif", image, tile=(128, 128))
    windows = []

    def bright(tile, model, normalize=False, bbox_threshold=0.4, device="cpu"):
        windows.append(tile.shape)
        return label(tile[..., 2] > 0.5).astype(np.int32), None, None

    monkeypatch.setattr(published, "segment_cellular_image", bright)
    argv = ["--cellsam_checkpoint", str(tiny_file), "--sam_size", "vit_tiny", "--images", str(tmp_path / "images"),
            "--window", "256", "--overlap", "64"]  # fmt: skip
    whole_out = cellsam_evaluate.main(
        cellsam_evaluate.get_args_parser().parse_args([*argv, "--output_dir", str(tmp_path / "whole")])
    )
    whole = tifffile.imread(whole_out / "labels" / "plate.tif").astype(np.int64)
    monkeypatch.setattr(cellsam_data, "IN_MEMORY_PX", 300 * 300)
    windows.clear()
    out = cellsam_evaluate.main(
        cellsam_evaluate.get_args_parser().parse_args([*argv, "--output_dir", str(tmp_path / "tiled")])
    )
    streamed = np.asarray(zarr.open_group(str(out / "labels" / "plate.ome.zarr"), mode="r")["0"][:])
    assert len(windows) == 4 * 5 and max(windows) == (256, 256, 3)
    n = int(whole.max())
    assert n >= 250 and streamed.max() == n
    pairs = np.unique(np.stack([whole.ravel(), streamed.ravel()]), axis=1)
    assert len(pairs[0]) == n + 1 and ((pairs[0] == 0) == (pairs[1] == 0)).all()
    table = pd.read_csv(out / "cells" / "plate.csv")
    assert table["cell_id"].tolist() == list(range(1, n + 1))
    ys, xs = np.nonzero(streamed == 7)
    assert table.loc[6, ["centroid_y_px", "centroid_x_px"]].tolist() == pytest.approx([ys.mean(), xs.mean()], abs=0.01)
    features = json.loads((out / "geojson" / "plate.geojson").read_text())["features"]
    assert [f["properties"]["label_id"] for f in features] == list(range(1, n + 1))
