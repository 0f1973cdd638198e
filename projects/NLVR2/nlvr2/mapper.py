"""``NLVR2DatasetMapper``: a statement record -> both images, the sentence tokens and the label.

Output: ``image_0`` / ``image_1`` uint8 (3, S, S) in ``INPUT.FORMAT``; ``input_ids`` /
``attention_mask`` (T,); ``label`` (0/1) passes through with the record's other fields. A record whose
image is missing is an error naming the record and the file.
"""

from __future__ import annotations

import copy

from fiber_d2.data.vl_mapper import FusedTaskMapper

__all__ = ["NLVR2DatasetMapper"]


class NLVR2DatasetMapper(FusedTaskMapper):
    """Map NLVR2 records (see the module docstring); arguments of
    :class:`fiber_d2.data.vl_mapper.FusedTaskMapper`."""

    def __call__(self, dataset_dict: dict) -> dict:
        """Map one record.

        Raises:
            BadRecordError: "NLVR2 record <identifier>: cannot read image <file>: ..." (one line).
        """
        record = copy.copy(dataset_dict)
        name = f"NLVR2 record {record.get('identifier')}"
        for k in (0, 1):
            record[f"image_{k}"] = self.image(record, f"file_name_{k}", f"image_{k}", name)
        record.update(self.encode(record["sentence"], name))
        return record
