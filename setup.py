"""Maps the repository's folders to import packages (metadata lives in pyproject.toml).

The project's layout (docs/ARCHITECTURE.md, first lines) keeps some packages in top-level folders
named for what they hold (`kernels/` is `l2a_kernels`, `data_prep/` is `l2a_data_prep`), which
pyproject's static `packages.find` cannot express, so the mapping is computed here.
The Hydra config tree ships as the package `l2a_configs` so that installed entry points
find it through Hydra's `pkg://` search path, editable install or not.
"""

from setuptools import find_namespace_packages, find_packages, setup

FOLDERS = {
    "l2a_common": "src/l2a_common",
    "l2a_train": "src/l2a_train",
    "l2a_kernels": "kernels",
    "l2a_data_prep": "data_prep",
    "l2a_configs": "configs",
}

packages, package_dir = [], {}
for name, folder in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    # Config groups are plain folders of YAML: namespace packages, so their files ship as data.
    finder = find_namespace_packages if name == "l2a_configs" else find_packages
    for sub in finder(folder, exclude=["__pycache__*"]):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"": ["*.yaml"], "l2a_data_prep": ["assets/*"]},
)
