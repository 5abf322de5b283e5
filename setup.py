"""Packaging for txkernel: interactive parallel computing on Twisted."""

from setuptools import find_packages, setup

setup(
    name="txkernel",
    version="0.1.0.dev0",
    description="Interactive parallel computing for Python on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # twisted.plugins is listed so our plugin file lands in Twisted's plugin
    # package; it has no __init__.py of its own on purpose.
    packages=find_packages(include=["kernel", "kernel.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted[tls]>=23.8",
        "zope.interface>=6",
        "foolscap>=23.11",
        "cloudpickle>=3.0",
        "tqdm>=4.60",
        # Poly1305 for the native transport's large frames (also pulled in by twisted[tls])
        "cryptography>=3.4",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.2",
            "numpy>=1.24",
            "ipython>=8",
            # tests/test_client_jupyter.py runs the clients and magics in a
            # real Jupyter kernel (brings jupyter_client)
            "ipykernel>=6",
            "sphinx>=7",  # the user guide must build without warnings
            "myst-parser>=2",
            "ruff==0.17.*",  # pinned: new releases add rules to the selected sets
        ],
    },
    entry_points={"console_scripts": ["txkernel = kernel.cli:main"]},
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Distributed Computing",
    ],
)
