"""Retrieval readers on fixture folders in each data set's exact layout, and digits end to end."""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat
from sklearn.datasets import load_digits
from torchvision import transforms as T

from evaluation import features, metrics, retrieval_sets
from evaluation.retrieval_sets import read

torch.set_num_threads(1)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cub_keeps_classes_101_to_200(tmp_path):
    classes = [1, 1, 100, 101, 101, 150, 200, 200]
    names = [f"{c:03d}.Bird_{c}/Bird_{c}_{i}.jpg" for i, c in enumerate(classes, 1)]
    write(tmp_path / "images.txt", "".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    write(tmp_path / "image_class_labels.txt", "".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    ds = read("cub", tmp_path)
    assert ds.paths == [str(tmp_path / "images" / n) for n in names[3:]]
    assert ds.labels.tolist() == [101, 101, 150, 200, 200]
    assert list(ds.splits) == [""] and ds.splits[""].gallery is None
    assert ds.splits[""].query.tolist() == [0, 1, 2, 3, 4]
    assert ds.ks == (1, 2, 4, 8)


def test_cars_keeps_classes_99_to_196_from_cars_annos_mat(tmp_path):
    classes = [1, 98, 99, 150, 196, 99]
    annos = np.zeros((1, len(classes)), dtype=[(f, "O") for f in
                                               ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2",
                                                "class", "test")])
    for i, c in enumerate(classes):
        annos[0, i] = (np.array([f"car_ims/{i + 1:06d}.jpg"]), *[np.array([[5]], dtype=np.uint16)] * 4,
                       np.array([[c]], dtype=np.uint8), np.array([[i % 2]], dtype=np.uint8))
    savemat(tmp_path / "cars_annos.mat", {"annotations": annos, "class_names": np.array([["a", "b"]], dtype=object)})
    ds = read("cars", tmp_path)
    assert ds.paths == [str(tmp_path / f"car_ims/{i:06d}.jpg") for i in (3, 4, 5, 6)]
    assert ds.labels.tolist() == [99, 150, 196, 99]
    assert ds.splits[""].gallery is None and len(ds.splits[""].query) == 4


def test_sop_reads_ebay_test(tmp_path):
    write(tmp_path / "Ebay_test.txt", "image_id class_id super_class_id path\n"
          "1 11319 1 bicycle_final/111085122871_0.JPG\n2 11319 1 bicycle_final/111085122871_1.JPG\n"
          "3 11320 2 chair_final/111265328556_0.JPG\n")
    write(tmp_path / "Ebay_train.txt", "image_id class_id super_class_id path\n1 1 1 bicycle_final/x.JPG\n")
    ds = read("sop", tmp_path)
    rel = ("bicycle_final/111085122871_0.JPG", "bicycle_final/111085122871_1.JPG", "chair_final/111265328556_0.JPG")
    assert ds.paths == [str(tmp_path / p) for p in rel]
    assert ds.labels.tolist() == [11319, 11319, 11320]
    assert ds.ks == (1, 10, 100, 1000)


def test_inshop_query_and_gallery_from_list_eval_partition(tmp_path):
    rows = [("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
            ("img/WOMEN/Dresses/id_00000008/01_1_front.jpg", "id_00000008", "query"),
            ("img/WOMEN/Dresses/id_00000008/01_2_side.jpg", "id_00000008", "gallery"),
            ("img/MEN/Denim/id_00000100/01_1_front.jpg", "id_00000100", "gallery"),
            ("img/MEN/Denim/id_00000100/01_2_side.jpg", "id_00000100", "query")]
    write(tmp_path / "Eval" / "list_eval_partition.txt",
          f"{len(rows)}\nimage_name item_id evaluation_status\n" + "".join(f"{a}   {b}   {c}\n" for a, b, c in rows))
    ds = read("inshop", tmp_path)
    assert ds.paths == [str(tmp_path / "Img" / r[0]) for r in rows[1:]]
    split = ds.splits[""]
    assert [ds.paths[i].split("/")[-1] for i in split.query] == ["01_1_front.jpg", "01_2_side.jpg"]
    assert split.query.tolist() == [0, 3] and split.gallery.tolist() == [1, 2]
    assert ds.labels[0] == ds.labels[1] != ds.labels[2] == ds.labels[3]
    assert ds.ks == (1, 10, 20, 30, 40, 50)


def test_inat_labels_from_the_class_folder_of_the_brown_et_al_list(tmp_path):
    lines = ["train_val2018/Plantae/7477/3b60c9486db1d2ee875f11a669fbde4a.jpg",
             "train_val2018/Plantae/7477/aa.jpg", "train_val2018/Aves/2761/bb.jpg"]
    write(tmp_path / "Inat_dataset_splits" / "Inaturalist_test_set1.txt", "\n".join(lines) + "\n")
    write(tmp_path / "Inat_dataset_splits" / "Inaturalist_train_set1.txt", "train_val2018/Aves/1/cc.jpg\n")
    ds = read("inat", tmp_path)
    assert ds.paths == [str(tmp_path / p) for p in lines]
    assert ds.labels.tolist() == [7477, 7477, 2761]
    assert ds.ks == (1, 4, 16, 32)


def vehicleid_fixture(root):
    """The three test lists; the larger lists share images with the smaller ones, as in the release;
    vehicles hold 1 to 4 images (a single-image vehicle is a query that cannot be matched)."""
    rng = np.random.default_rng(3)
    lists = {}
    for size, vehicles in ((800, range(1, 9)), (1600, range(5, 17)), (2400, range(1, 25))):
        pairs = [(f"{v * 100 + j:07d}", f"{v:04d}") for v in vehicles for j in range(1 + v % 4)]
        rng.shuffle(pairs)
        lists[size] = pairs
        write(root / "train_test_split" / f"test_list_{size}.txt", "".join(f"{a} {b}\n" for a, b in pairs))
    return lists


def test_vehicleid_each_test_list_is_a_single_set(tmp_path):
    lists = vehicleid_fixture(tmp_path)
    ds = read("vehicleid", tmp_path)
    assert set(ds.splits) == {"800", "1600", "2400"} and ds.ks == (1, 5)
    assert len(ds.paths) == len(set(ds.paths)) == len({a for pairs in lists.values() for a, _ in pairs})
    name = [p.split("/")[-1][:-4] for p in ds.paths]
    assert all(p == str(tmp_path / "image" / f"{n}.jpg") for p, n in zip(ds.paths, name))
    for size, pairs in lists.items():
        split = ds.splits[str(size)]
        assert split.gallery is None and split.relevant is None  # all against all, query left out
        assert sorted(name[i] for i in split.query) == sorted(a for a, _ in pairs)
        assert [ds.labels[i] for i in split.query] == [int(dict(pairs)[name[i]]) for i in split.query]


def test_vehicleid_recall_is_leave_one_out_within_each_list(tmp_path):
    """Recall@1/@5 per list against a brute-force numpy reference: every image of the list against
    all the others of that list."""
    lists = vehicleid_fixture(tmp_path)
    ds = read("vehicleid", tmp_path)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(ds.labels.max() + 1, 16))
    feats = centres[ds.labels] + 1.2 * rng.normal(size=(len(ds.labels), 16))  # hits and misses both
    got = metrics.evaluate(feats, ds, device="cpu")
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    name = [p.split("/")[-1][:-4] for p in ds.paths]
    row = {n: i for i, n in enumerate(name)}
    for size, pairs in lists.items():
        rows = np.array([row[a] for a, _ in pairs])
        vehicle = np.array([int(b) for _, b in pairs])
        for k in (1, 5):
            hits = []
            for q in range(len(rows)):
                others = np.delete(np.arange(len(rows)), q)
                sims = x[rows[others]] @ x[rows[q]]
                top = others[np.argsort(-sims, kind="stable")[:k]]
                hits.append(bool((vehicle[top] == vehicle[q]).any()))
            assert got[f"{size}/R@{k}"] == pytest.approx(np.mean(hits)), (size, k)
    assert 0.2 < got["800/R@1"] < 0.95 and got["2400/R@5"] > got["2400/R@1"]


def test_gldv2_public_and_private_queries_against_the_index(tmp_path):
    index = ["0a1b2c3d", "1f2e3d4c", "abcdef01"]
    write(tmp_path / "index.csv", "id\n" + "\n".join(index) + "\n")
    write(tmp_path / "retrieval_solution_v2.1.csv", "id,images,Usage\n"
          "fedcba98,0a1b2c3d abcdef01,Public\n"
          "12345678,None,Ignored\n"
          "99999999,1f2e3d4c,Private\n")
    ds = read("gldv2", tmp_path)
    assert ds.paths[:3] == [str(tmp_path / "index" / i[0] / i[1] / i[2] / f"{i}.jpg") for i in index]
    assert ds.paths[3:] == [str(tmp_path / "test/f/e/d/fedcba98.jpg"), str(tmp_path / "test/9/9/9/99999999.jpg")]
    pub, priv = ds.splits["public"], ds.splits["private"]
    assert pub.query.tolist() == [3] and priv.query.tolist() == [4]
    assert pub.gallery.tolist() == [0, 1, 2]
    assert [r.tolist() for r in pub.relevant] == [[0, 2]] and [r.tolist() for r in priv.relevant] == [[1]]


def test_gldv2_solution_naming_an_unknown_index_image(tmp_path):
    write(tmp_path / "index.csv", "id\n0a1b2c3d\n")
    write(tmp_path / "retrieval_solution_v2.1.csv", "id,images,Usage\nfedcba98,0a1b2c3d 77777777,Public\n")
    with pytest.raises(ValueError, match="'77777777' that is not in .*index.csv"):
        read("gldv2", tmp_path)


@pytest.mark.parametrize("name,expected,doc", [
    ("cub", "images.txt", "cub_200_2011"), ("cars", "cars_annos.mat", "car_dataset"),
    ("sop", "Ebay_test.txt", "lifted_struct"), ("inshop", "Eval/list_eval_partition.txt", "DeepFashion"),
    ("inat", "Inat_dataset_splits/Inaturalist_test_set1.txt", "Smooth_AP"),
    ("vehicleid", "train_test_split/test_list_800.txt", "pku-vehicleid"),
    ("gldv2", "index.csv", "google-landmark")])
def test_missing_list_file_names_the_path_and_the_documentation(tmp_path, name, expected, doc):
    with pytest.raises(FileNotFoundError) as err:
        read(name, tmp_path)
    assert f"expected {tmp_path / expected}" in str(err.value) and doc in str(err.value)


def test_malformed_line_names_file_and_line(tmp_path):
    write(tmp_path / "Ebay_test.txt", "image_id class_id super_class_id path\n1 5 1 a/b.JPG\n2 5\n")
    with pytest.raises(ValueError, match=r"Ebay_test.txt line 3: expected 4 columns"):
        read("sop", tmp_path)


def test_unknown_set_name():
    with pytest.raises(ValueError, match="unknown retrieval set 'cub200'; known: cub, cars"):
        read("cub200", "/nowhere")


def test_digits_as_sop_through_reader_features_and_metrics(tmp_path):
    """Real handwritten digits written as an SOP folder: the real reader, extractor and metrics."""
    digits = load_digits()
    keep = np.arange(0, len(digits.images), 3)  # 599 images keep the test fast
    lines = ["image_id class_id super_class_id path"]
    for n, i in enumerate(keep, 1):
        rel = f"digit_final/{i:04d}.png"
        (tmp_path / "digit_final").mkdir(exist_ok=True)
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(tmp_path / rel)
        lines.append(f"{n} {digits.target[i]} 1 {rel}")
    write(tmp_path / "Ebay_test.txt", "\n".join(lines) + "\n")
    ds = read("sop", tmp_path)
    images = features.ImageFiles(ds.paths, T.Compose([T.Grayscale(), T.ToTensor()]))
    feats = features.extract(torch.nn.Flatten(), images, batch_size=64, workers=0, device="cpu")
    pixels = (digits.images[keep] * 255 / 16).astype(np.uint8).reshape(len(keep), -1) / 255
    np.testing.assert_allclose(feats, pixels, atol=1e-6)  # rows in list order, lossless PNG round trip

    got = metrics.evaluate(feats, ds, device="cpu")
    # Independent brute force: cosine similarities, self excluded, first hit rank.
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    same = ds.labels[order] == ds.labels[:, None]
    for k in (1, 10, 100):
        assert got[f"R@{k}"] == pytest.approx(same[:, :k].any(1).mean())
    assert got["R@1"] > 0.9  # raw-pixel kNN on digits is known to be ~97% accurate
