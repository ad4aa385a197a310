"""Everything is in setup.cfg except the package list: `packages = find:` there cannot also name
the data packages that setup.cfg's package_dir maps onto the top-level prompts/ and export/."""
from setuptools import find_packages, setup

DATA_PACKAGES = ["mlx_refusal.data.prompts", "mlx_refusal.data.export"]

setup(packages=find_packages(include=["mlx_refusal", "mlx_refusal.*"]) + DATA_PACKAGES)
