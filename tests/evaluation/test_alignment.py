"""Pixel-text alignment (supplement eq. 10): the formula, the model outputs and the evaluator."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluators, inference_on_dataset
from detectron2.modeling import build_model

from hvlformer.data import HVLFormerSemanticDatasetMapper, register_shapes
from hvlformer.evaluation import HVLSemSegEvaluator, PixelTextAlignmentEvaluator, build_sem_seg_evaluator
from hvlformer.modeling.alignment import pixel_text_alignment


def brute_force(queries, pixels):
    """Eq. 10 literally: mean over k and p of cos(q_k^e, Z^p), per level e."""
    q = F.normalize(queries, dim=-1)  # E x K x D
    z = F.normalize(pixels.flatten(1), dim=0)  # D x P
    return torch.einsum("ekd,dp->ekp", q, z).mean(dim=(1, 2))


def test_formula_matches_the_definition_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    queries, pixels = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 8, 6, 7, generator=g)
    out = pixel_text_alignment(queries, pixels)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out[1], brute_force(queries[1], pixels[1]))
    valid = pixel_text_alignment(queries, pixels, [(6, 7), (4, 3)])
    torch.testing.assert_close(valid[0], out[0])
    torch.testing.assert_close(valid[1], brute_force(queries[1], pixels[1, :, :4, :3]))
    # identical directions -> 1, opposite -> -1
    ones = torch.ones(1, 1, 2, 4)
    assert pixel_text_alignment(ones, torch.ones(1, 4, 3, 3)).item() == pytest.approx(1.0)
    assert pixel_text_alignment(ones, -torch.ones(1, 4, 3, 3)).item() == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="MASK_DIM"):
        pixel_text_alignment(queries, torch.randn(2, 6, 4, 4))


def test_evaluator_averages_per_level():
    evaluator = PixelTextAlignmentEvaluator()
    evaluator.reset()
    evaluator.process([{}, {}], [{"pixel_text_alignment": torch.tensor([0.2, 0.4, 0.6])},
                                 {"pixel_text_alignment": torch.tensor([0.4, 0.6, 0.8])}])
    result = evaluator.evaluate()["pixel_text_alignment"]
    assert result["level_1"] == pytest.approx(0.3) and result["level_3"] == pytest.approx(0.7)
    assert result["mean"] == pytest.approx(0.5) and result["num_images"] == 2
    with pytest.raises(ValueError, match="TEST.PIXEL_TEXT_ALIGNMENT"):
        evaluator.process([{"file_name": "a.jpg"}], [{"sem_seg": torch.zeros(2, 4, 4)}])


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    names = register_shapes(num_classes=6, image_size=48, num_train=2, num_val=3, seed=1,
                            root=tmp_path_factory.mktemp("align_shapes"), name="align_shapes")
    return names[1]


def test_build_sem_seg_evaluator_adds_the_alignment_when_asked(small_dataset, tmp_path, tiny_cfg):
    cfg = get_cfg()  # plain detectron2 config, without the HVLFormer keys: mIoU only
    cfg.OUTPUT_DIR = str(tmp_path)
    assert isinstance(build_sem_seg_evaluator(cfg, small_dataset), HVLSemSegEvaluator)
    cfg = tiny_cfg("TEST.PIXEL_TEXT_ALIGNMENT", "True", small=(), freeze=False)
    cfg.OUTPUT_DIR = str(tmp_path)
    evaluator = build_sem_seg_evaluator(cfg, small_dataset)
    assert isinstance(evaluator, DatasetEvaluators)
    assert {type(e) for e in evaluator._evaluators} == {HVLSemSegEvaluator, PixelTextAlignmentEvaluator}


@pytest.fixture(scope="module")
def make_model(tiny_cfg):
    """Factory: the tiny model with the alignment metric on, in eval mode, and its config."""
    def make(*opts):
        cfg = tiny_cfg("TEST.PIXEL_TEXT_ALIGNMENT", "True", *opts)
        torch.manual_seed(0)
        return build_model(cfg).eval(), cfg

    return make


def test_model_outputs_carry_the_alignment(single_thread, make_model):
    model, _ = make_model()
    g = torch.Generator().manual_seed(0)
    batch = [{"image": torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g)},
             {"image": torch.randint(0, 256, (3, 64, 32), dtype=torch.uint8, generator=g)}]
    with torch.no_grad():
        outputs = model(batch)
        images = model.preprocess_images(batch)
        predicted = model.predict(images.tensor, model.encode_text())
    assert [o["sem_seg"].shape for o in outputs] == [(6, 40, 56), (6, 64, 32)]
    assert predicted.refined_queries.shape == (2, 3, 6, 64)
    # padded batch 64 x 64: mask features 16 x 16; image 0 covers 10 x 14 cells, image 1 16 x 8
    for i, cells in enumerate([(10, 14), (16, 8)]):
        expected = brute_force(predicted.refined_queries[i],
                               predicted.mask_features[i, :, : cells[0], : cells[1]])
        torch.testing.assert_close(outputs[i]["pixel_text_alignment"], expected, rtol=1e-4, atol=1e-5)
    # sliding-window inference: the windows of an image are averaged; same outputs otherwise
    sliding, _ = make_model("TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.CROP_SIZE", "32",
                            "TEST.SLIDING_WINDOW.STRIDE", "24")
    with torch.no_grad():
        out = sliding(batch[:1])
    assert out[0]["sem_seg"].shape == (6, 40, 56) and out[0]["pixel_text_alignment"].shape == (3,)
    # 40 x 56 with 32-pixel windows, stride 24: tops 0, 8 and lefts 0, 24; each window fills its 8 x 8 cells
    image = sliding.preprocess_images(batch[:1]).tensor[0, :, :40, :56]
    per_window = []
    with torch.no_grad():
        for top in (0, 8):
            for left in (0, 24):
                window = sliding.predict(image[None, :, top: top + 32, left: left + 32], sliding.encode_text())
                per_window.append(brute_force(window.refined_queries[0], window.mask_features[0]))
    torch.testing.assert_close(out[0]["pixel_text_alignment"], torch.stack(per_window).mean(dim=0),
                               rtol=1e-4, atol=1e-5)
    sliding.pixel_text_alignment = False
    with torch.no_grad():
        plain = sliding(batch[:1])
    assert "pixel_text_alignment" not in plain[0]
    torch.testing.assert_close(plain[0]["sem_seg"], out[0]["sem_seg"])


def test_inference_on_dataset_reports_miou_and_alignment(small_dataset, tmp_path, single_thread, make_model):
    model, cfg = make_model("DATASETS.TEST", f"('{small_dataset}',)")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.OUTPUT_DIR = str(tmp_path)
    mapper = HVLFormerSemanticDatasetMapper(cfg, is_train=False)
    loader = [[mapper(d)] for d in DatasetCatalog.get(small_dataset)]
    results = inference_on_dataset(model, loader, build_sem_seg_evaluator(cfg, small_dataset))
    assert 0.0 <= results["sem_seg"]["mIoU"] <= 100.0
    alignment = results["pixel_text_alignment"]
    assert alignment["num_images"] == 3 and set(alignment) == {"mean", "level_1", "level_2", "level_3", "num_images"}
    assert -1.0 <= alignment["mean"] <= 1.0
