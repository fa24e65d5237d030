"""Test-only stand-in for ``qwen_vl_utils`` (whose module imports torchvision, absent on CPU machines).

Only ``fetch_image`` is provided, the one function verl's ``MultiTurnSFTDataset`` calls: the image
(PIL, or a path) in RGB, resized as qwen_vl_utils does (sides multiples of ``2 * image_patch_size``,
at most the dict's ``max_pixels``). Put this folder first on ``PYTHONPATH`` of a test's child process.
"""

from PIL import Image

from karl_verl.boxes import smart_resize


def fetch_image(ele, image_patch_size=14):
    image = ele["image"] if isinstance(ele["image"], Image.Image) else Image.open(ele["image"])
    factor = image_patch_size * 2
    height, width = smart_resize(image.height, image.width, factor=factor, min_pixels=4 * factor * factor,
                                 max_pixels=ele.get("max_pixels", 16384 * factor * factor))
    return image.convert("RGB").resize((width, height))
