"""What a detector's contiguous labels mean: class names and dataset category ids."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

# torchvision's 91 COCO outputs after its background (index i is category id i + 1);
# "N/A" marks ids that COCO 2017 does not use.
TORCHVISION_COCO_NAMES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A",
    "backpack", "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis",
    "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table",
    "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]
TORCHVISION_COCO_IDS = list(range(1, 91))

# The 80 COCO 2017 categories in id order: detectron2's contiguous labels 0..79.
COCO_NAMES = [n for n in TORCHVISION_COCO_NAMES if n != "N/A"]
COCO_IDS = [i for i, n in zip(TORCHVISION_COCO_IDS, TORCHVISION_COCO_NAMES) if n != "N/A"]


def to_dataset_ids(labels: Sequence[int], category_ids: Sequence[int]) -> List[int]:
    """Contiguous labels -> dataset category ids through ``category_ids`` (label k ->
    ``category_ids[k]``): the one mapping that evaluation, ``predict`` and submission use."""
    n = len(category_ids)
    out = []
    for k in labels:
        k = int(k)
        if not 0 <= k < n:
            raise ValueError(f"label {k} is outside the {n} contiguous classes 0..{n - 1}")
        out.append(int(category_ids[k]))
    return out


@dataclass
class Metadata:
    """``class_names[k]`` and ``category_ids[k]`` describe contiguous label ``k``; for a
    panoptic model, ``stuff_names[s]`` names semantic label ``s`` (0 is "things")."""

    class_names: List[str]
    category_ids: List[int] = field(default_factory=list)
    dataset: Optional[str] = None
    stuff_names: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.category_ids:
            self.category_ids = list(range(len(self.class_names)))
        if len(self.category_ids) != len(self.class_names):
            raise ValueError(f"metadata has {len(self.class_names)} class names but "
                             f"{len(self.category_ids)} category ids")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def dataset_ids(self, labels: Sequence[int]) -> List[int]:
        """The dataset category id of each contiguous label (``to_dataset_ids``)."""
        return to_dataset_ids(labels, self.category_ids)

    @property
    def is_placeholder(self) -> bool:
        """Names made up by a model built without class metadata (``class_0``, ...)."""
        return self.class_names == [f"class_{i}" for i in range(self.num_classes)]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Metadata":
        return cls(class_names=list(d["class_names"]), category_ids=list(d["category_ids"]),
                   dataset=d.get("dataset"), stuff_names=list(d.get("stuff_names", [])))

    @classmethod
    def coco(cls) -> "Metadata":
        """The 80 COCO 2017 classes (detectron2's contiguous order)."""
        return cls(class_names=list(COCO_NAMES), category_ids=list(COCO_IDS), dataset="coco")

    @classmethod
    def torchvision_coco(cls) -> "Metadata":
        """torchvision's 90 COCO outputs, "N/A" included (label k is category id k + 1)."""
        return cls(class_names=list(TORCHVISION_COCO_NAMES),
                   category_ids=list(TORCHVISION_COCO_IDS), dataset="coco")
