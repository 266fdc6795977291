"""Maps the repository's folders to import packages (metadata lives in pyproject.toml).

The layout of DESIGN.md keeps each package in its own top-level folder, which
pyproject's static `packages.find` cannot express, so the mapping is computed here.
The Hydra config tree ships as the package `l2a_configs` so that installed entry points
find it through Hydra's `pkg://` search path, editable install or not.
"""

from setuptools import find_packages, setup

FOLDERS = {
    "l2a_train": "src/l2a_train",
    "l2a_kernels": "kernels",
    "l2a_data_prep": "data_prep",
    "l2a_configs": "configs",
}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"l2a_configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml"], "l2a_data_prep": ["assets/*"]},
    include_package_data=True,
)
