"""MONAI Deploy application: a DICOM radiograph in, the owner's watermarked DICOM out (MONAI Deploy App SDK 4.0).

    DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator -> XRayLoaderOperator -> MonaiBundleInferenceOperator
    -> PreviewWriterOperator

The SDK's loader and selector find the DICOM instance; :class:`XRayLoaderOperator` hands the bundle operator the
[0, 1] image that the bundle's own reader gives, with its meta (the file and its intensity chain), instead of
DICOMSeriesToVolumeOperator's volume, which keeps neither the VOI mapping nor the stored-value type that the
watermark is written back into. The SDK's MonaiBundleInferenceOperator runs ``models/model.ts`` as
scripts/export_deploy.py writes it (configs ``inference`` + ``deploy``): preprocessing (LoadXRayd passes the image
through, letterbox), the scripted watermarking network, and the postprocessing, whose SaveWatermarkedd writes the
marked file into the output folder in the source's container (header, transfer syntax, stored type: the release's
own writer and budget check), as a derived image with a new SOP Instance UID that references the source, so that a
MAP sending it to the PACS holding the source does not collide with it (``sop_instance_uid`` in inference.json).
The operator's ``pred`` is an 8-bit preview (the SDK casts image outputs to uint8), written as ``<name>_preview.png``.
One radiograph per run, as the SDK's single-series operators take it.

Run: ``python scripts/deploy_app.py -i DICOM_FOLDER -o OUTPUT -m models/model.ts`` (the SDK's own arguments; also
``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH``, ``HOLOSCAN_MODEL_PATH`` in a MAP).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Image, IOType, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)
from PIL import Image as PILImage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `xmark_bundle` importable when run as a script

from xmark_bundle.data import LoadXRay  # noqa: E402
from xmark_bundle.fileio import atomic_path  # noqa: E402

CONFIG_NAMES = ["inference", "deploy"]  # scripts/export_deploy.py embeds both in model.ts


class XRayLoaderOperator(Operator):
    """The selected series' one radiograph as an SDK ``Image``: XRayReader's ``H x W`` [0, 1] image and its meta."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("study_selected_series_list")
        spec.output("image")

    def compute(self, op_input, op_output, context) -> None:
        selected = op_input.receive("study_selected_series_list") or []
        files = [
            instance.get_native_sop_instance().filename
            for study in selected
            for series in study.selected_series
            for instance in series.series.get_sop_instances()
        ]
        if len(files) != 1:
            raise ValueError(
                f"the input holds {len(files)} DICOM images ({', '.join(map(str, files[:3]))}"
                f"{', ...' if len(files) > 3 else ''}); "
                "this app marks one radiograph per run (configs/inference.json marks a whole folder)"
            )
        image = LoadXRay()(files[0])
        op_output.emit(Image(image[0].numpy(), metadata=dict(image.meta)), "image")


class PreviewWriterOperator(Operator):
    """Writes the bundle operator's 8-bit ``pred`` (the marked image at the watermark's resolution) as a PNG."""

    def __init__(self, fragment, *args, output_folder: Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("pred")

    def compute(self, op_input, op_output, context) -> None:
        pred = op_input.receive("pred")
        source = Path(pred.metadata()["filename_or_obj"])
        out = self.output_folder / f"{source.stem}_preview.png"
        with atomic_path(out) as tmp:
            PILImage.fromarray(np.asarray(pred.asnumpy(), dtype=np.uint8)).save(tmp, format="PNG")


class XMarkDeployApp(Application):
    """DICOM radiograph in, watermarked DICOM (and preview) out."""

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        output = Path(context.output_path)
        # deploy.json reads the folders from the MAP's environment variables; a local run passes them as -i / -o
        os.environ["HOLOSCAN_INPUT_PATH"] = str(Path(context.input_path).resolve())
        os.environ["HOLOSCAN_OUTPUT_PATH"] = str(output.resolve())
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=context.input_path, name="loader")
        selector = DICOMSeriesSelectorOperator(self, name="selector")
        xray = XRayLoaderOperator(self, name="xray_loader")
        bundle = MonaiBundleInferenceOperator(
            self,
            app_context=context,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_config_names=BundleConfigNames(config_names=CONFIG_NAMES),
            bundle_path=context.model_path,
            name="xmark",
        )
        preview = PreviewWriterOperator(self, output_folder=output, name="preview")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, xray, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(xray, bundle, {("image", "image")})
        self.add_flow(bundle, preview, {("pred", "pred")})


if __name__ == "__main__":
    XMarkDeployApp().run()
