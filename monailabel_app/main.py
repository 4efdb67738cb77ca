"""A MONAI Label app that serves the X-Mark bundle (MONAI Label 0.8.5, ``make test-monailabel`` builds its environment).

    monailabel start_server --app monailabel_app --studies DATA --host 127.0.0.1 [--conf bundle PATH]

``DATA`` is a folder of images (MONAI Label's local datastore; ``*.dcm`` files are listed too) or a DICOMweb URL
(``http[s]://...``). With ``--conf datastore dicomfile`` a folder of DICOM files goes through MONAI Label's DICOMweb
datastore instead, over dicomweb-client's ``DICOMfileClient``, which serves a folder as a DICOMweb server would: the
series route (image ids are SeriesInstanceUIDs) without a PACS.
``--conf bundle PATH`` names the bundle root (configs, ``models/model.pt``, the ``xmark_bundle`` package); by default
``model/xmark`` in the app folder, else the bundle this folder belongs to (the repository root).

What differs from MONAI Label's stock bundle tasks, and why:

- A DICOMweb datastore hands the task the downloaded series folder, never MONAI Label's DICOM-to-NIfTI conversion
  (``MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI`` is switched off): SimpleITK's NIfTI keeps no Bits Stored, so 15-bit data
  would arrive as uint16 and the owner's budget (16/255 of the data's range) would be spent on the 16-bit range,
  twice as many stored units. The bundle reads a folder holding one DICOM as that file.
- Inference returns the file that ``configs/inference.json`` writes (:meth:`XMarkInferTask.writer`), in its source's
  container: a DICOM keeps the source's header, MONOCHROME1 and Bits Stored included, as a derived image with a new
  SOP Instance UID (``sop_instance_uid``), and a lossy file (JPEG, JPEG baseline DICOM) keeps the budget after its
  re-encoding. MONAI Label's ITK writer labels every DICOM MONOCHROME2 (a MONOCHROME1 source would display inverted),
  names its output by the input's extension (a series folder has none), and encoding ``pred`` again with a lossy
  codec would move pixels past the budget.
- An input the bundle cannot read or write back (a series of several images, a CT slice, a 12-bit JPEG DICOM) is
  answered 422 with the bundle's message naming the file and the problem, not MONAI Label's bare "Internal Server
  Error".
- Multi-GPU training runs torchrun with this interpreter and the bundle root on ``PYTHONPATH`` (its processes import
  ``xmark_bundle``) and raises when torchrun fails; MONAI Label's task logs "Training Finished" whatever the exit
  status. Training still refuses to replace the owner's ``models/model.pt`` (``configs/train.json``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from dicomweb_client.file import DICOMfileClient
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

logger = logging.getLogger(__name__)

MODEL = "xmark"
WATERMARK_REPORT = "watermark"  # where SaveWatermarkedd (configs/inference.json) leaves its report
TORCHRUN_TAIL = 40  # lines of torchrun's output that an error quotes
TORCHRUN_ERRORS = 5  # distinct exception lines of its processes that an error quotes first
EXCEPTION_LINE = re.compile(r"\b\w*(Error|Exception|Exit): ")


def bundle_root(app_dir: str | os.PathLike, conf: dict[str, str]) -> Path:
    """The bundle this app serves: ``conf["bundle"]``, else ``<app>/model/xmark``, else the app folder's parent."""
    app_dir = Path(app_dir)
    candidates = [Path(conf["bundle"])] if conf.get("bundle") else [app_dir / "model" / MODEL, app_dir.parent]
    for root in candidates:
        if (root / "configs" / "inference.json").is_file():
            return root.resolve()
    raise FileNotFoundError(
        f"{' or '.join(str(c / 'configs' / 'inference.json') for c in candidates)}: no X-Mark bundle found; pass "
        "--conf bundle PATH with the bundle root (configs, models/model.pt, the xmark_bundle package)"
    )


def _extension(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix


class XMarkInferTask(BundleInferTask):
    """MONAI Label's bundle inference; the result is the marked file in the source's container (module docstring).

    A client's ``result_extension`` is not honoured: a marked image in another container would not be the release.
    """

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, Any]:
        from xmark_bundle.data import XRayMeta, XRayWriteError, write_stored
        from xmark_bundle.data.xray_writer import is_lossy

        meta = data.get("pred_meta_dict", {}).get("xray")
        if meta is None:  # RestoreWatermarkedd writes it: without it pred is no marked image
            raise ValueError(
                f"{self.bundle_config_path}: postprocessing left no pred_meta_dict['xray'] (RestoreWatermarkedd must "
                "be its last transform)"
            )
        meta = XRayMeta(**{**meta, "shape": tuple(meta["shape"])})
        report = data.get(WATERMARK_REPORT)
        if isinstance(report, dict) and report.get("unwritable"):  # SaveWatermarkedd skipped it: nothing to return
            raise XRayWriteError(meta.source, report["unwritable"])
        handle, name = tempfile.mkstemp(suffix=_extension(Path(meta.source)))
        os.close(handle)
        if isinstance(report, dict) and report.get("path"):
            # the file configs/inference.json wrote: its header (a derived DICOM's UID) and, for a lossy codec, the
            # residual already shrunk where re-encoding broke the budget; encoding the stored values again would not be
            shutil.copyfile(report["path"], name)
            out = Path(name)
        elif is_lossy(meta):
            os.unlink(name)
            raise XRayWriteError(
                meta.source,
                "a lossy source is re-encoded here without the budget check that SaveWatermarkedd makes (its pixels "
                "could move by more than epsilon); set save_watermarked true in the bundle's inference.json",
            )
        else:  # save_watermarked false: the stored values, lossless, are the release's pixels
            derived = self.bundle_config.get("sop_instance_uid", "new") == "new"
            pred = data["pred"]
            stored = np.asarray(getattr(pred, "array", pred))
            stored = stored.reshape(stored.shape[-2:]).T  # MONAI's (x, y) back to rows x columns
            out = write_stored(stored, meta, name, derived=derived)
        logger.info(f"X-Mark: marked {meta.source} -> {out}")
        return str(out), data.get(self.output_json_key, {})


class XMarkTrainTask(BundleTrainTask):
    """MONAI Label's bundle training; its torchrun processes import the bundle and their failure is an error."""

    def run_multi_gpu(self, request: dict[str, Any], cmd: list[str], env: dict[str, str]) -> None:
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (self.bundle_path, env.get("PYTHONPATH")) if p)
        if cmd and cmd[0] == "torchrun":  # the server's interpreter, whatever PATH holds
            cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
        logger.info(f"X-Mark: running {cmd} with PYTHONPATH={env['PYTHONPATH']}")
        tail: collections.deque[str] = collections.deque(maxlen=TORCHRUN_TAIL)
        errors: dict[str, None] = {}  # the processes' exception lines, in order, each once
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=self.bundle_path
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                print(line, end="", flush=True)
                tail.append(line.rstrip())
                if EXCEPTION_LINE.search(line) and "ChildFailedError" not in line and len(errors) < TORCHRUN_ERRORS:
                    errors[line.strip()] = None
        if process.returncode:
            raise RuntimeError(
                f"{self.bundle_path}: multi-GPU training failed (torchrun exit status {process.returncode}); the "
                "processes' errors:\n" + "\n".join(errors) + "\ntorchrun's last lines:\n" + "\n".join(tail)
            )


class XMarkApp(MONAILabelApp):
    """Serves the X-Mark bundle as the model ``xmark`` (inference and the guarded training task)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.bundle = bundle_root(app_dir, conf)
        if str(self.bundle) not in sys.path:  # the app's own imports of xmark_bundle (the tasks add it for theirs)
            sys.path.insert(0, str(self.bundle))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="X-Mark",
            description="Dataset-ownership watermark for chest X-rays (X-Mark bundle)",
        )

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's inference; an input the bundle cannot read is a 422 whose detail names the file and the
        problem (the server answers any other error with a bare "Internal Server Error")."""
        from xmark_bundle.data import XRayLoadError, XRayWriteError

        try:
            return super().infer(request, datastore)
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, (XRayLoadError, XRayWriteError)):
                cause = cause.__cause__
            if cause is None:
                raise
            raise HTTPException(status_code=422, detail=str(cause)) from err

    def init_datastore(self) -> Datastore:
        if self.conf.get("datastore") == "dicomfile":
            url = Path(self.studies).resolve().as_uri()
            client = DICOMfileClient(url=url, in_memory=True, update_db=True, readonly=True)
            return self._dicomweb_datastore(client)
        if self.conf.get("datastore"):
            raise ValueError(f"--conf datastore {self.conf['datastore']!r}: the only choice is 'dicomfile'")
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        extensions = list(settings.MONAI_LABEL_DATASTORE_FILE_EXT)
        return LocalDatastore(
            self.studies,
            extensions=extensions if "*.dcm" in extensions else [*extensions, "*.dcm"],
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        if settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI:
            logger.info("X-Mark: DICOMweb series reach the task as DICOM files, not converted to NIfTI")
            settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI = False
        return super()._init_dicomweb_datastore()

    def _dicomweb_datastore(self, client: Any) -> Datastore:
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return DICOMWebDatastore(
            client=client,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache_path or None,
            fetch_by_frame=False,
            convert_to_nifti=False,
        )

    def init_infers(self) -> dict[str, InferTask]:
        try:
            from xmark_bundle.errors import require_checkpoint
        except ModuleNotFoundError as err:  # a folder of configs and models without the package
            raise ModuleNotFoundError(
                f"{self.bundle}: the bundle's Python package xmark_bundle is not importable ({err}); give --conf "
                "bundle PATH with the bundle root (configs/, models/model.pt, xmark_bundle/) or pip install the bundle"
            ) from err

        # MONAI Label's is_valid also accepts models/model.ts alone, which cannot mark: the checkpoint is required
        require_checkpoint(self.bundle / "models" / "model.pt")
        task = XMarkInferTask(str(self.bundle), self.conf)
        if not task.is_valid():
            raise FileNotFoundError(f"{self.bundle}: MONAI Label does not take it as a bundle (configs, models)")
        return {MODEL: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        return {MODEL: XMarkTrainTask(str(self.bundle), self.conf)}
