"""Package discovery that cannot forget a subpackage: every package under ddpm_fast/, and every
package under kernels/ and export/ installed inside ddpm_fast (as ddpm_fast.kernels... and
ddpm_fast.export...), so that ddpm-fast never claims the top-level names `kernels` or `export`.
Everything else about the distribution is in pyproject.toml."""

from setuptools import find_packages, setup

MAPPED = ("kernels", "export")  # top-level folders of the repository that install in ddpm_fast

packages = find_packages(include=["ddpm_fast", "ddpm_fast.*"])
for folder in MAPPED:
    packages += [f"ddpm_fast.{name}" for name in find_packages(include=[folder, f"{folder}.*"])]

setup(packages=packages, package_dir={f"ddpm_fast.{folder}": folder for folder in MAPPED})
