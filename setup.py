from setuptools import find_packages, setup


DEMO_REQUIREMENTS = ["gradio>=6.0,<7", "gradio_client>=2.0"]
# ONNX export (`hf-hierseg export-onnx`, torch.onnx.export(dynamo=True) needs onnxscript) and ONNX Runtime.
ONNX_REQUIREMENTS = ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.3"]

setup(
    name="hf_hierseg",
    version="0.1.0",
    description="CAST (hierarchical segmentation ViT, ICLR 2024) for the Hugging Face ecosystem",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["hf_hierseg", "hf_hierseg.*"]),
    package_data={"hf_hierseg": ["assets/default_model/*", "evaluation/modules/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "transformers>=5.0,<6",
        "torch>=2.4",
        "datasets>=3.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "huggingface-hub>=1.0",
        "safetensors>=0.4",
        "peft>=0.13",
        "numpy>=1.24",
        "pillow>=10.0",
        "opencv-contrib-python-headless>=4.8",
        "tqdm",
    ],
    extras_require={
        # The tests include the explorer's: its page served by Gradio, driven in Chromium through selenium.
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",  # the suite on every core: `pytest -n logical --dist loadfile`
            "tensorboard",
            "ruff",
            "import-linter>=2.1",
            "hypothesis",
            *DEMO_REQUIREMENTS,
            *ONNX_REQUIREMENTS,
            "selenium>=4.10",
        ],
        # The hierarchy explorer (`hf-hierseg serve`, `hf-hierseg export-space`).
        "demo": DEMO_REQUIREMENTS,
        # ONNX export and ONNX Runtime (`hf-hierseg export-onnx`, `hf_hierseg.export`).
        "onnx": ONNX_REQUIREMENTS,
    },
    entry_points={"console_scripts": ["hf-hierseg=hf_hierseg.cli:main"]},
)
