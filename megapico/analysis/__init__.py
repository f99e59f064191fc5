"""pico-analyze's learning-dynamics metrics computed on megapico's captures, written as pico-analyze writes them."""

from megapico.analysis.metrics import analyze, needed_for_targets
from megapico.analysis.results import existing_results, flat_scalars, results_directory, write_results
from megapico.analysis.spec import AnalysisSpec, ComponentSpec, MetricSpec, check_analysis, load_analysis

__all__ = ["AnalysisSpec", "ComponentSpec", "MetricSpec", "analyze", "check_analysis", "existing_results",
           "flat_scalars", "load_analysis", "needed_for_targets", "results_directory", "write_results"]
