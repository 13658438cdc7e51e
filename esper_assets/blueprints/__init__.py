"""Blueprints: the domain layer for network-module descriptions and their kernels.

    from esper_assets.blueprints import parse_blueprint, compile_blueprint, load_kernel
    bp = parse_blueprint(path.read_bytes(), source=str(path),
                         expected_name=blueprint_name_for_file(path.name))
    kernel = compile_blueprint(bp)          # CompiledKernel: id + safetensors bytes
    y = load_kernel(kernel.artifact).forward(x)

No Dagster import here: training processes use this package directly.
"""

from esper_assets.blueprints.compiler import (
    COMPILER_VERSION,
    SUPPORTED_TARGETS,
    CompiledKernel,
    CompileError,
    compile_blueprint,
    kernel_id_for,
)
from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.blueprints.kernel import LoadedKernel, load_kernel
from esper_assets.blueprints.ops import SUPPORTED_OPS
from esper_assets.blueprints.spec import (
    BLUEPRINT_SUFFIXES,
    NAME_PATTERN,
    Blueprint,
    BlueprintInvalid,
    BlueprintLimits,
    Problem,
    blueprint_name_for_file,
    name_problem,
    parse_blueprint,
)

__all__ = [
    "BLUEPRINT_SUFFIXES",
    "COMPILER_VERSION",
    "NAME_PATTERN",
    "SUPPORTED_OPS",
    "SUPPORTED_TARGETS",
    "Blueprint",
    "BlueprintInvalid",
    "BlueprintLimits",
    "CompileError",
    "CompiledKernel",
    "LoadedKernel",
    "Problem",
    "blueprint_name_for_file",
    "compile_blueprint",
    "example_blueprint_files",
    "kernel_id_for",
    "load_kernel",
    "name_problem",
    "parse_blueprint",
]
