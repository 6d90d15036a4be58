"""The public surface, name by name: what ``lightning_xai`` and each subpackage export (``__all__``).

A name that appears or disappears fails here, so a change of the public API is a decision written into this list,
not an accident. A package exports nothing public beyond its ``__all__`` (helpers live in underscore modules), and
every exported name resolves.
"""
import importlib
import types

import pytest

EXPORTS = {
    "lightning_xai": [
        "AttributionMonitor", "FeatureVisMonitor", "LinearProbeMonitor", "ProjectionMonitor",
        "SampleInfluenceMonitor", "ShortcutDiscovery", "ShortcutMonitor", "TabularAttributionMonitor",
        "TokenAttributionMonitor", "__version__",
    ],
    "lightning_xai.attribution": [
        "CaptumMethod", "METHODS", "Method", "Passes", "from_captum", "gaussian_blur", "get_method", "grad_cam",
        "grid_segments", "input_x_gradient", "integrated_gradients", "is_signed", "lime", "method_pass_counts",
        "method_passes", "occlusion", "saliency", "smoothgrad",
    ],
    "lightning_xai.callbacks": [
        "ProbeSetCallback", "StreamingCallback", "XAICallback", "extract_xy",
    ],
    "lightning_xai.datasets": [
        "MODES", "NUM_CLASSES", "ShortcutData", "VARIANTS", "load_digits_tensors", "plant", "region_mask",
        "shortcut_digits", "split_indices",
    ],
    "lightning_xai.featvis": [
        "Blur", "Compose", "FeatureVisResult", "FourierParam", "GeneratorParam", "Jitter", "L1", "L2", "Objective",
        "Pad", "Parametrization", "PixelParam", "RandomRotate", "RandomScale", "Regularizer", "TotalVariation",
        "channel", "class_logit", "default_regularizers", "default_transforms", "direction", "diversity",
        "layer_objective", "make_param", "neuron", "render",
    ],
    "lightning_xai.probes": [
        "ActivationCapture", "LogisticSolution", "Reducer", "RidgeSolution", "StreamingRidge", "fit_logistic",
        "make_reducer",
    ],
    "lightning_xai.projections": [
        "PCAResult", "SEPARATION_METHODS", "capture_activations", "class_separation", "pca", "silhouette_score",
        "variance_ratio",
    ],
    "lightning_xai.render": [
        "CARD_WIDTH", "CYAN", "ColorBar", "DIVERGING_CMAP", "Figure", "Layout", "MAX_COLUMNS", "RED",
        "SEQUENTIAL_CMAP", "TextBox", "apply_colormap", "attribution_colorbar", "attribution_figure", "auto_columns",
        "barh_image", "evidence_figure", "evolution_figure", "figure_to_image", "fit_cells", "font_size",
        "grid_figure", "heat", "image_figure", "make_grid", "maps_figure", "matrix_figure", "normalize_maps",
        "outline", "overlay", "pool_to", "reduce_maps", "robust_max", "scatter_image", "share_maps", "spread",
        "to_display", "upscale",
    ],
    "lightning_xai.samples": [
        "RepresenterFit", "capture_features", "cosine_topk", "dataset_features", "representer_points", "support",
        "suspect_scores",
    ],
    "lightning_xai.text": [
        "BASELINES", "TOKEN_METHODS", "attribution_markdown", "decode_tokens", "token_attributions", "token_share",
        "tokens_markdown",
    ],
    "lightning_xai.text.synthetic": [
        "MODES", "NEGATIVE_WORDS", "NEUTRAL_WORDS", "PAD", "POSITIVE_WORDS", "SPURIOUS", "TokenData", "VOCAB",
        "spurious_token_data", "vocab",
    ],
    "lightning_xai.shortcuts": [
        "Candidate", "InterventionPlan", "ShortcutConfig", "Verdict", "check_region", "decide", "discover",
        "plan_interventions", "region_metrics", "run_plan",
    ],
}
SKIPPED = ()
PACKAGES = [name for name in EXPORTS if importlib.util.find_spec(name).submodule_search_locations is not None]


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in EXPORTS])
def test_exported_names_are_the_listed_ones(name):
    module = importlib.import_module(name)
    assert sorted(module.__all__) == EXPORTS[name], (
        f"{name}.__all__ changed: added {sorted(set(module.__all__) - set(EXPORTS[name]))}, "
        f"removed {sorted(set(EXPORTS[name]) - set(module.__all__))}")
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ lists a name twice"
    for export in module.__all__:  # resolves (the root's callbacks lazily)
        assert getattr(module, export) is not None


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in PACKAGES])
def test_packages_export_nothing_beyond_their_all(name):
    module = importlib.import_module(name)
    public = {n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    stray = sorted(public - set(module.__all__))
    assert not stray, f"{name} has public names outside __all__: {stray}"


def test_every_public_subpackage_is_listed():
    import pkgutil

    import lightning_xai

    public = {f"lightning_xai.{info.name}" for info in pkgutil.iter_modules(lightning_xai.__path__)
              if not info.name.startswith("_")}
    assert public == set(EXPORTS) - {"lightning_xai"} - {"lightning_xai.text.synthetic"} | set(SKIPPED)
