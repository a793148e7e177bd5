"""A flat-layout COCO-format dataset with non-contiguous named categories (ids 3, 7, 12), made from the synthetic
shapes: train.json, val.json and one folder of images, as a user's own data comes."""
import json
import os
import shutil

from detr_irpe_datasets.synthetic import ensure_synthetic_coco

IDS = {1: 3, 2: 7, 3: 12}  # synthetic id -> ours
NAMES = {3: 'circle', 7: 'square', 12: 'triangle'}


def make_flat_dataset(folder, num_train=8, num_val=4, image_size=64):
    """folder/{train.json, val.json, images/} with categories 3, 7, 12; returns the four data flags."""
    synthetic = ensure_synthetic_coco(os.path.join(folder, 'synthetic'), num_train=num_train, num_val=num_val,
                                      image_size=image_size, num_classes=3, objects=(1, 2), object_size=(0.3, 0.5))
    images = os.path.join(folder, 'images')
    os.makedirs(images, exist_ok=True)
    for split in ('train', 'val'):
        with open(os.path.join(synthetic, 'annotations', f'instances_{split}2017.json')) as f:
            data = json.load(f)
        for image in data['images']:  # one folder for both splits: their file names must differ
            name = f"{split}_{image['file_name']}"
            shutil.copy(os.path.join(synthetic, f'{split}2017', image['file_name']), os.path.join(images, name))
            image['file_name'] = name
        data['categories'] = [{'id': i, 'name': n, 'supercategory': 'shape'} for i, n in NAMES.items()]
        for ann in data['annotations']:
            ann['category_id'] = IDS[ann['category_id']]
        with open(os.path.join(folder, f'{split}.json'), 'w') as f:
            json.dump(data, f)
    shutil.rmtree(synthetic)
    os.remove(os.path.join(folder, 'synthetic.lock'))
    return ['--train_json', os.path.join(folder, 'train.json'), '--train_images', images,
            '--val_json', os.path.join(folder, 'val.json'), '--val_images', images]
