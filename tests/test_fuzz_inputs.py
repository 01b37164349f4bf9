"""Property tests (hypothesis) of the input checks of `CastImageProcessor` and of the CAST models: random shapes,
dtypes, channel layouts, value ranges, settings and label maps. Every case either works, with the result the
documented conversion gives, or raises a `ValueError` / `TypeError` with a message; never another exception, a hang
or a silently different result. A huge input is refused before any large allocation.

Example counts (`settings(max_examples=...)`): see `EXAMPLES`; `deadline=None` (timings on shared CI machines vary),
no example database (runs are reproducible from the seed hypothesis prints on failure).
"""

import functools
import tracemalloc

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_hierseg.image_processing_cast import CastImageProcessor


EXAMPLES = {"representations": 120, "arrays": 200, "settings": 80, "label_maps": 100, "model": 80, "labels": 60}


def fuzz(name):
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def assert_refused(error):
    """A refusal is a ValueError / TypeError whose message says something."""
    assert isinstance(error, (ValueError, TypeError)), f"{type(error).__name__}: {error}"
    assert len(str(error)) > 10, repr(error)


def processed(processor, images, **kwargs):
    """(pixel_values, superpixels) as numpy, or the exception raised."""
    try:
        output = processor(images=images, return_tensors="np", **kwargs)
    except Exception as error:  # classified by the caller
        return error
    return output["pixel_values"], output["superpixels"]


def assert_valid_output(pixel_values, superpixels, batch, height, width):
    assert pixel_values.shape == (batch, 3, height, width) and pixel_values.dtype == np.float32
    assert np.isfinite(pixel_values).all()
    assert superpixels.shape == (batch, height, width) and superpixels.dtype == np.int64
    for label_map in superpixels:  # labels 0..S-1, every one used
        assert np.array_equal(np.unique(label_map), np.arange(label_map.max() + 1))


# ---------------------------------------------------------------------------------------------------------------
# One image, many representations: the same pixels, the same outputs
# ---------------------------------------------------------------------------------------------------------------

SMALL = dict(do_resize=False, do_center_crop=False, superpixel_method="grid", num_superpixels=400)


@st.composite
def rgb_images(draw, min_side=1, max_side=12):
    height = draw(st.integers(min_side, max_side))
    width = draw(st.integers(min_side, max_side))
    gray = draw(st.booleans())
    values = draw(st.lists(st.integers(0, 255), min_size=height * width * 3, max_size=height * width * 3))
    image = np.asarray(values, dtype=np.uint8).reshape(height, width, 3)
    if gray:
        image = np.repeat(image[..., :1], 3, axis=-1)
    return image


def representations(image):
    """(name, input, input_data_format) of the same 8-bit RGB image `[H, W, 3]`, as the processor documents them."""
    height, width = image.shape[:2]
    layout = "channels_last" if height in (1, 3, 4) else None  # [H, W, 3] could read as [C, H', W'] otherwise
    first = "channels_first" if width in (1, 3, 4) else None
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    found = [
        ("uint8 HWC", image, layout),
        ("uint8 CHW", chw, first),
        ("torch uint8 CHW", torch.from_numpy(chw), first),
        ("torch uint8 HWC", torch.from_numpy(image), layout),
        ("uint16", image.astype(np.uint16) * 257, layout),
        ("int64 in 0..255", image.astype(np.int64), layout),
        ("int16 in 0..255", image.astype(np.int16), layout),
        ("float32 in [0, 1]", image.astype(np.float32) / 255, layout),
        ("float64 in [0, 1]", image.astype(np.float64) / 255, layout),
        ("float16 in [0, 1]", (image.astype(np.float32) / 255).astype(np.float16), layout),
        ("torch float32 CHW", torch.from_numpy(chw).float() / 255, first),
        ("PIL RGB", PIL.Image.fromarray(image, "RGB"), None),
        (
            "PIL RGBA opaque",
            PIL.Image.fromarray(np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), "RGBA"),
            None,
        ),
        ("uint8 RGBA opaque", np.dstack([image, np.full(image.shape[:2], 255, np.uint8)]), layout),
    ]
    if (image == image[..., :1]).all():  # grayscale
        gray = image[..., 0]
        found += [
            ("uint8 HW", gray, None),
            ("PIL L", PIL.Image.fromarray(gray, "L"), None),
            ("uint8 HW1", gray[..., None], layout),
            ("uint8 1HW", gray[None], first),
            ("PIL I;16", PIL.Image.fromarray(gray.astype(np.uint16) * 257), None),
        ]
    return found


@fuzz("representations")
@given(image=rgb_images(), method=st.sampled_from(["grid", "grid", "seeds", "slic"]))
def test_every_representation_of_an_image_gives_the_same_outputs(image, method):
    processor = CastImageProcessor(**{**SMALL, "superpixel_method": method})
    expected = processed(processor, image, input_data_format="channels_last")
    if isinstance(expected, Exception):  # e.g. SEEDS on a 1x1 image: then every representation is refused
        assert_refused(expected)
        for name, representation, layout in representations(image):
            assert isinstance(processed(processor, representation, input_data_format=layout), type(expected)), name
        return
    assert_valid_output(*expected, 1, *image.shape[:2])
    mean, std = np.asarray(processor.image_mean).reshape(3, 1, 1), np.asarray(processor.image_std).reshape(3, 1, 1)
    np.testing.assert_allclose(expected[0][0], (image.transpose(2, 0, 1) / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    for name, representation, layout in representations(image):
        got = processed(processor, representation, input_data_format=layout)
        assert not isinstance(got, Exception), f"{name}: {got!r}"
        assert np.array_equal(got[0], expected[0]), name
        assert np.array_equal(got[1], expected[1]), name


@fuzz("representations")
@given(images=st.lists(rgb_images(min_side=5, max_side=5), min_size=1, max_size=3))
def test_a_batch_array_is_its_images(images):
    processor = CastImageProcessor(**SMALL)
    from_list = processed(processor, images)
    from_batch = processed(processor, np.stack(images))  # [B, 5, 5, 3]
    assert np.array_equal(from_list[0], from_batch[0]) and np.array_equal(from_list[1], from_batch[1])


# ---------------------------------------------------------------------------------------------------------------
# Arbitrary arrays: the documented rules decide
# ---------------------------------------------------------------------------------------------------------------

NUMPY_DTYPES = [np.uint8, np.uint16, np.uint32, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32]
NUMPY_DTYPES += [np.float64, np.bool_, np.complex64]
TORCH_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32]
TORCH_DTYPES += [torch.float64, torch.bool]


@st.composite
def arrays(draw):
    ndim = draw(st.sampled_from([0, 1, 2, 3, 3, 3, 4, 5]))
    shape = [draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, 7)) for _ in range(ndim)]
    if ndim in (3, 4) and draw(st.booleans()):  # a plausible channel axis
        shape[draw(st.sampled_from([-1, -3]))] = draw(st.sampled_from([1, 2, 3, 4, 5]))
    kind = draw(st.sampled_from(["in range", "in range", "wide", "special"]))
    if draw(st.booleans()):
        dtype = draw(st.sampled_from(TORCH_DTYPES))
        numpy_dtype = torch.empty(0, dtype=dtype if dtype != torch.bfloat16 else torch.float32).numpy().dtype
    else:
        dtype = numpy_dtype = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    size = int(np.prod(shape))
    # The pixels come from a drawn seed (up to 7^5 of them: too many to draw one by one), an edge value from
    # hypothesis.
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if np.issubdtype(numpy_dtype, np.floating) or np.issubdtype(numpy_dtype, np.complexfloating):
        low, high = (0.0, 1.0) if kind == "in range" else (-2.0, 300.0)
        values = rng.uniform(low, high, size)
        edges = [low, high] if kind != "special" else [np.nan, np.inf, -np.inf]
    elif numpy_dtype == np.bool_:
        values, edges = rng.integers(0, 2, size).astype(bool), [True, False]
    else:
        info = np.iinfo(numpy_dtype)
        low, high = (0, min(255, info.max)) if kind == "in range" else (int(info.min), int(info.max))
        values, edges = rng.integers(low, high, size, endpoint=True, dtype=np.int64), [low, high]
    if size:
        values[draw(st.integers(0, size - 1))] = draw(st.sampled_from(edges))
    values = values.reshape(shape)
    if isinstance(dtype, torch.dtype):
        return torch.from_numpy(np.asarray(values, dtype=numpy_dtype)).to(dtype)
    return np.asarray(values, dtype=dtype)


def documented_verdict(array, do_rescale=True):
    """What the processor's documented rules say of one array image: "ok", or the exception type it raises."""
    values = array.float().numpy() if isinstance(array, torch.Tensor) and array.dtype == torch.bfloat16 else array
    values = values.numpy() if isinstance(values, torch.Tensor) else values
    if values.ndim == 4:
        verdicts = {documented_verdict(image, do_rescale) for image in array} if len(array) else {ValueError}
        return "ok" if verdicts == {"ok"} else sorted(verdicts - {"ok"}, key=str)[0]
    if values.ndim not in (2, 3):
        return ValueError
    if values.ndim == 3:
        first, last = values.shape[0] in (1, 3, 4), values.shape[2] in (1, 3, 4)
        if first == last:
            return ValueError
        height, width = values.shape[1:] if first else values.shape[:2]
    else:
        height, width = values.shape
    if height < 1 or width < 1:
        return ValueError
    if not do_rescale and not np.issubdtype(values.dtype, np.floating):
        return ValueError
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.complexfloating):
        return TypeError
    if np.issubdtype(values.dtype, np.floating):
        return "ok" if np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1 else ValueError
    if values.dtype == np.uint16:
        return "ok"
    return "ok" if values.min() >= 0 and values.max() <= 255 else ValueError


@fuzz("arrays")
@given(array=arrays(), do_rescale=st.booleans())
def test_any_array_either_works_as_documented_or_is_refused_with_a_message(array, do_rescale):
    processor = CastImageProcessor(**SMALL)
    result = processed(processor, array, do_rescale=do_rescale)
    verdict = documented_verdict(array, do_rescale)
    if verdict == "ok":
        assert not isinstance(result, Exception), repr(result)
        values = array.float() if isinstance(array, torch.Tensor) and array.dtype == torch.bfloat16 else array
        batch = values.shape[0] if values.ndim == 4 else 1
        single = values[0] if values.ndim == 4 else values
        if single.ndim == 2:
            height, width = single.shape
        else:
            height, width = single.shape[1:] if single.shape[0] in (1, 3, 4) else single.shape[:2]
        assert_valid_output(*result, batch, height, width)
    else:
        assert isinstance(result, Exception), f"accepted, but the documented rules refuse it ({verdict.__name__})"
        assert_refused(result)


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


def expected_size(height, width, do_resize, size, do_center_crop, crop_size):
    """(height, width) of the output, as the processor documents its geometry (torchvision's Resize(int) and
    CenterCrop), or None where a setting cannot work."""
    if do_resize:
        if "shortest_edge" in size:
            edge = size["shortest_edge"]
            if edge < 1:
                return None
            if width <= height:
                height, width = int(edge * height / width), edge
            else:
                height, width = edge, int(edge * width / height)
        else:
            if size["height"] < 1 or size["width"] < 1:
                return None
            height, width = size["height"], size["width"]
        if height < 1 or width < 1:
            return None
    if do_center_crop:
        if crop_size["height"] < 1 or crop_size["width"] < 1:
            return None
        height, width = crop_size["height"], crop_size["width"]
    return height, width


sides = st.integers(-1, 24)


@fuzz("settings")
@given(
    image=rgb_images(max_side=16),
    do_resize=st.booleans(),
    size=st.one_of(
        st.builds(lambda edge: {"shortest_edge": edge}, sides),
        st.fixed_dictionaries({"height": sides, "width": sides}),
    ),
    do_center_crop=st.booleans(),
    crop_size=st.fixed_dictionaries({"height": sides, "width": sides}),
    method=st.sampled_from(["grid", "slic", "seeds"]),
    num_superpixels=st.integers(-2, 500),
    return_tensors=st.sampled_from(["np", "pt"]),
)
def test_any_settings_either_give_the_documented_geometry_or_are_refused(
    image, do_resize, size, do_center_crop, crop_size, method, num_superpixels, return_tensors
):
    expected = expected_size(*image.shape[:2], do_resize, size, do_center_crop, crop_size)
    try:
        processor = CastImageProcessor(superpixel_method=method, num_superpixels=num_superpixels)
        output = processor(
            images=image,
            input_data_format="channels_last",
            do_resize=do_resize,
            size=size,
            do_center_crop=do_center_crop,
            crop_size=crop_size,
            return_tensors=return_tensors,
        )
    except Exception as error:
        assert_refused(error)
        reason = str(error)
        # The documented refusals: a setting that cannot work, or SEEDS on an image too small for it.
        assert expected is None or num_superpixels < 1 or "SEEDS cannot place" in reason, reason
        return
    assert expected is not None and num_superpixels >= 1
    pixel_values, superpixels = (np.asarray(output[key]) for key in ("pixel_values", "superpixels"))
    assert_valid_output(pixel_values, superpixels, 1, *expected)


# ---------------------------------------------------------------------------------------------------------------
# Precomputed superpixels (label maps)
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def label_maps(draw, height, width):
    kind = draw(st.sampled_from(["valid", "valid", "valid", "negative", "float", "bool", "shape", "torch"]))
    values = draw(st.lists(st.integers(0, 10_000), min_size=height * width, max_size=height * width))
    label_map = np.asarray(values, dtype=np.int64).reshape(height, width) % draw(st.integers(1, height * width + 5))
    label_map *= draw(st.sampled_from([1, 7, 1000]))  # ids with gaps
    if kind == "negative":
        label_map.flat[draw(st.integers(0, height * width - 1))] = -draw(st.integers(1, 5))
    elif kind == "float":
        return kind, label_map.astype(draw(st.sampled_from([np.float32, np.float64])))
    elif kind == "bool":
        return kind, label_map > 0
    elif kind == "shape":
        return kind, np.zeros((height + draw(st.integers(1, 3)), width), dtype=np.int64)
    elif kind == "torch":
        return kind, torch.from_numpy(label_map).to(draw(st.sampled_from([torch.int32, torch.int64, torch.uint8])))
    return kind, label_map.astype(draw(st.sampled_from([np.int64, np.int32, np.uint16, np.int8])), casting="unsafe")


def same_partition(labels, relabelled):
    """Two label maps group the pixels the same way."""
    pairs = np.unique(np.stack([labels.ravel(), relabelled.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@fuzz("label_maps")
@given(data=st.data(), height=st.integers(1, 10), width=st.integers(1, 10), crop=st.booleans())
def test_precomputed_superpixels_keep_their_partition_or_are_refused(data, height, width, crop):
    kind, label_map = data.draw(label_maps(height, width))
    image = np.zeros((height, width, 3), dtype=np.uint8)
    crop_size = {"height": data.draw(st.integers(1, height)), "width": data.draw(st.integers(1, width))}
    processor = CastImageProcessor(do_resize=False, do_center_crop=crop, crop_size=crop_size)
    result = processed(processor, image, superpixels=label_map, input_data_format="channels_last")
    as_array = label_map.numpy() if isinstance(label_map, torch.Tensor) else label_map
    refused = kind in ("float", "bool", "shape") or as_array.min() < 0
    if refused:
        assert isinstance(result, Exception), f"{kind} label map accepted"
        assert_refused(result)
        return
    assert not isinstance(result, Exception), repr(result)
    out_height, out_width = (crop_size["height"], crop_size["width"]) if crop else (height, width)
    assert_valid_output(*result, 1, out_height, out_width)
    top, left = int(round((height - out_height) / 2.0)), int(round((width - out_width) / 2.0))
    expected_region = as_array.astype(np.int64)[top : top + out_height, left : left + out_width]
    assert same_partition(expected_region, result[1][0])


# ---------------------------------------------------------------------------------------------------------------
# The models' input checks
# ---------------------------------------------------------------------------------------------------------------

PATCH = 8  # the ConvStem's stride


@functools.cache
def tiny_models():
    """Tiny CAST models, built once (a module-level cache: hypothesis would print a fixture's value)."""
    from hf_hierseg.configuration_cast import CastConfig
    from hf_hierseg.modeling_cast import CastForImageClassification, CastForSemanticSegmentation, CastModel

    torch.manual_seed(0)
    config = CastConfig.from_preset(
        "cast-small",
        hidden_size=24,
        num_attention_heads=4,
        depths=(1, 1, 1, 1),
        num_clusters=(8, 4, 2, 1),
        image_size=32,
        num_labels=3,
    )
    assert config.patch_size == PATCH
    return {
        "backbone": CastModel(config).eval(),
        "classifier": CastForImageClassification(config).eval(),
        "segmenter": CastForSemanticSegmentation(config).eval(),
    }


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int64, torch.uint8, torch.bool]
LABEL_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8, torch.bool, torch.float32]


@st.composite
def model_inputs(draw):
    batch = draw(st.sampled_from([0, 1, 1, 2]))
    height = PATCH * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    width = PATCH * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 0, 0, 3]))
    channels = draw(st.sampled_from([3, 3, 3, 1, 4]))
    ndim = draw(st.sampled_from([4, 4, 4, 4, 3, 5]))
    dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES if draw(st.integers(0, 5)) == 0 else FLOAT_DTYPES))
    shape = [batch, channels, height, width][4 - ndim :] if ndim <= 4 else [batch, 1, channels, height, width]
    pixel_values = torch.rand(*[max(side, 0) for side in shape]).to(dtype)
    # Superpixels: consecutive grid cells, ids with gaps, or something wrong.
    kind = draw(st.sampled_from(["grid", "grid", "grid", "gaps", "negative", "too large", "float", "bool", "numpy"]))
    kind = draw(st.sampled_from([kind, kind, kind, "shape"]))
    side = max(height, 1), max(width, 1)
    cells = draw(st.integers(1, 6))
    grid = (torch.arange(side[0])[:, None] * cells // side[0]) * cells + torch.arange(side[1])[
        None, :
    ] * cells // side[1]
    superpixels = grid.expand(batch, *side).clone()
    if kind == "gaps":
        superpixels = superpixels * draw(st.integers(2, 5))
    elif kind == "negative" and superpixels.numel():
        superpixels[..., 0, 0] = -1
    elif kind == "too large" and superpixels.numel():
        superpixels[..., 0, 0] = side[0] * side[1]
    elif kind == "float":
        superpixels = superpixels.float()
    elif kind == "bool":
        superpixels = superpixels > 0
    elif kind == "numpy":
        superpixels = superpixels.numpy()
    elif kind == "shape":
        superpixels = superpixels[..., : max(side[0] - 1, 1), :]
    superpixels = (
        superpixels.to(draw(st.sampled_from([torch.int64, torch.int32, torch.int16])))
        if kind
        in (
            "grid",
            "gaps",
        )
        else superpixels
    )
    return pixel_values, superpixels, kind


def structurally_valid(pixel_values, superpixels, kind):
    height, width = pixel_values.shape[-2:]
    return (
        pixel_values.ndim == 4
        and pixel_values.is_floating_point()
        and pixel_values.shape[0] >= 1
        and pixel_values.shape[1] == 3
        and height >= PATCH
        and width >= PATCH
        and height % PATCH == 0
        and width % PATCH == 0
        and kind in ("grid", "gaps")
        and tuple(superpixels.shape) == (pixel_values.shape[0], height, width)
    )


@fuzz("model")
@given(inputs=model_inputs(), which=st.sampled_from(["backbone", "classifier"]))
def test_the_model_either_runs_or_refuses_its_inputs_with_a_message(inputs, which):
    pixel_values, superpixels, kind = inputs
    model = tiny_models()[which]
    try:
        with torch.no_grad():
            output = model(pixel_values=pixel_values, superpixels=superpixels)
    except Exception as error:
        assert_refused(error)
        # Consecutive ids on well-formed tensors must work; ids with gaps may be refused (a token budget).
        assert not (structurally_valid(pixel_values, superpixels, kind) and kind == "grid"), repr(error)
        return
    assert structurally_valid(pixel_values, superpixels, kind), f"accepted {kind} inputs of {pixel_values.shape}"
    result = output.pooler_output if which == "backbone" else output.logits
    assert result.shape == (pixel_values.shape[0], 24 if which == "backbone" else 3)
    assert torch.isfinite(result).all()


@st.composite
def class_labels(draw, batch):
    dtype = draw(st.sampled_from(LABEL_DTYPES))
    size = draw(st.sampled_from([batch, batch, batch, batch + 1]))
    values = draw(st.lists(st.sampled_from([0, 1, 2, 2, 3, -1, -100]), min_size=size, max_size=size))
    if dtype == torch.bool:
        return torch.tensor(values) > 0
    return torch.tensor(values).to(dtype)


@fuzz("labels")
@given(data=st.data(), batch=st.integers(1, 2))
def test_classification_labels_either_give_a_loss_or_are_refused(data, batch):
    labels = data.draw(class_labels(batch))
    model = tiny_models()["classifier"]
    model.config.problem_type = None  # the loss infers it from the labels (and stores it)
    grid = (torch.arange(16)[:, None] // 8) * 2 + torch.arange(16)[None, :] // 8
    inputs = {"pixel_values": torch.rand(batch, 3, 16, 16), "superpixels": grid.expand(batch, 16, 16)}
    integer_ids = labels.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
    ids = labels.long()  # (a uint8 tensor compares with -100 as with 156)
    in_range = bool(((ids == -100) | ((ids >= 0) & (ids < 3))).all()) if integer_ids else False
    valid = integer_ids and in_range and labels.shape == (batch,)
    try:
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
    except Exception as error:
        assert_refused(error)
        assert not valid, repr(error)
        return
    assert valid or labels.is_floating_point(), f"accepted labels {labels}"  # float: multi-label targets
    # Cross-entropy over no counted image (all -100) is NaN, as in torch.
    assert loss.ndim == 0 and (torch.isfinite(loss) or not valid or bool((ids == -100).all()))


@fuzz("labels")
@given(data=st.data(), batch=st.integers(1, 2))
def test_segmentation_label_maps_either_give_a_loss_or_are_refused(data, batch):
    model = tiny_models()["segmenter"]
    height, width = 16, 16
    dtype = data.draw(st.sampled_from(LABEL_DTYPES))
    shape = data.draw(st.sampled_from([(batch, height, width)] * 3 + [(batch, height, width, 3), (batch, height)]))
    values = torch.tensor(data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 255, -1]), min_size=6, max_size=6)))
    labels = values[torch.randint(0, 6, shape, generator=torch.Generator().manual_seed(0))]
    labels = labels > 0 if dtype == torch.bool else labels.to(dtype)
    grid = (torch.arange(height)[:, None] // 8) * 2 + torch.arange(width)[None, :] // 8
    inputs = {"pixel_values": torch.rand(batch, 3, height, width), "superpixels": grid.expand(batch, height, width)}
    integer_ids = not labels.is_floating_point() and labels.dtype != torch.bool
    as_long = labels.long()
    valid = (
        integer_ids
        and labels.shape == (batch, height, width)
        and bool((((as_long >= 0) & (as_long < 3)) | (as_long == 255)).all())
    )
    try:
        with torch.no_grad():
            loss = model(**inputs, labels=labels).loss
    except Exception as error:
        assert_refused(error)
        assert not valid, repr(error)
        return
    assert valid, f"accepted labels of dtype {labels.dtype}, shape {tuple(labels.shape)}: {labels.unique()}"
    assert loss.ndim == 0


# ---------------------------------------------------------------------------------------------------------------
# Huge inputs
# ---------------------------------------------------------------------------------------------------------------


def test_a_huge_photo_at_native_resolution_is_refused_before_any_large_allocation():
    """A 6000x4000 photo with do_resize=False would get ~94k superpixels, and the model's attention ~70 GB."""
    photo = np.zeros((4000, 6000, 3), dtype=np.uint8)
    processor = CastImageProcessor()
    tracemalloc.start()
    try:
        with pytest.raises(
            ValueError, match=r"4000x6000 pixels processed\) would have about 93,750 superpixels.*do_resize=True"
        ):
            processor(images=photo, do_resize=False, do_center_crop=False, input_data_format="channels_last")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * photo.nbytes  # the 8-bit RGB copy of the input, nothing the size of its float or tokens
    # Resized, as by default, it is an ordinary input.
    output = processor(images=photo, return_tensors="np", input_data_format="channels_last")
    assert output["pixel_values"].shape == (1, 3, 224, 224)
