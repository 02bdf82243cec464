"""Packaging for cw (cluster-workers)."""
from setuptools import find_packages, setup

with open("README.rst", encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="cw",
    version="0.1.0",
    description="Route huge numbers of Python calls from clients to long-lived workers "
                "on a laptop, a shared-filesystem lab or a SLURM cluster",
    long_description=long_description,
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["cw", "cw.*"]),
    package_data={"cw": ["py.typed"]},  # PEP 561: cw's type hints are for its users' mypy
    install_requires=[
        "pyzmq>=25,<28",
        "msgpack>=1.0,<2",
        "tornado>=6.2,<7",
        "cloudpickle>=2.2,<4",
    ],
    extras_require={
        "progress": ["tqdm>=4.60"],
        "joblib": ["joblib>=1.3", "scikit-learn>=1.2"],
        "all": ["tqdm>=4.60", "joblib>=1.3", "scikit-learn>=1.2"],
        "bench": ["loky", "dask[distributed]", "ipyparallel", "matplotlib", "psutil"],
        "test": [
            "tqdm>=4.60",
            "joblib>=1.3",
            "scikit-learn>=1.2",
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "psutil>=5.9",
            "ruff==0.8.4",
            "mypy==1.13.0",
        ],
    },
    entry_points={
        "console_scripts": [
            "cw-master=cw.master:main",
            "cw-worker=cw.worker:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Topic :: System :: Distributed Computing",
    ],
)
