"""Pictures: visrank rows (sizes, frame colours, names) and sample grids."""

import numpy as np
import pytest
from PIL import Image

from synth_reid_jax import visualize

HEIGHT, WIDTH, TOPK = 32, 16, 3


def solid(value, shape=(20, 10, 3)):
  return np.full(shape, value, np.uint8)


def ranking_problem():
  # query 0 (pid 1, cam 0): gallery in distance order g3 (pid 1, cam 0: dropped), g0 (pid 1: right),
  # g2 (pid 2: wrong), g1 (pid 1: right), g4
  dist = np.array([[0.2, 0.4, 0.3, 0.1, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]], np.float32)
  q_pids, q_cams = np.array([1, 2]), np.array([0, 0])
  g_pids, g_cams = np.array([1, 1, 2, 1, 3]), np.array([1, 1, 1, 0, 1])
  return dist, q_pids, g_pids, q_cams, g_cams


def frame_colour(picture, rank):
  """Colour of the top-left frame pixel of the tile at `rank` (0 = the query)."""
  left = 0 if rank == 0 else rank * (WIDTH + visualize.RANK_SPACING) + visualize.QUERY_SPACING
  return tuple(int(c) for c in picture[1, left + 1])


def test_ranked_gallery_skips_same_camera_matches():
  gallery, correct = visualize.ranked_gallery(*ranking_problem(), query_index=0, topk=TOPK)
  np.testing.assert_array_equal(gallery, [0, 2, 1])
  np.testing.assert_array_equal(correct, [True, False, True])


def argsort_ranking(dist_row, q_pid, q_cam, g_pids, g_cams, topk):
  """torchreid's visrank order: a full argsort of the row, same pid + camid dropped."""
  order = np.argsort(dist_row)
  kept = order[~((g_pids[order] == q_pid) & (g_cams[order] == q_cam))]
  return kept[:topk]


@pytest.mark.parametrize("values", [1000, 3])  # continuous-ish, and heavy ties
def test_ranked_gallery_equals_a_full_argsort(values):
  rng = np.random.default_rng(values)
  dist = rng.integers(0, values, (6, 200)).astype(np.float32)
  dist[2, 5] = np.nan
  q_pids, q_cams = rng.integers(0, 4, 6), rng.integers(0, 2, 6)
  g_pids, g_cams = rng.integers(0, 4, 200), rng.integers(0, 2, 200)
  for q in range(6):
    for topk in (1, 10, 200):
      gallery, correct = visualize.ranked_gallery(dist, q_pids, g_pids, q_cams, g_cams, q, topk)
      expected = argsort_ranking(dist[q], q_pids[q], q_cams[q], g_pids, g_cams, topk)
      np.testing.assert_array_equal(gallery, expected)
      np.testing.assert_array_equal(correct, g_pids[expected] == q_pids[q])


def test_visrank_from_top_k_lists_draws_the_same_pictures(tmp_path):
  from synth_reid_jax import evaluation
  rng = np.random.default_rng(1)
  qf, gf = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
  _, q_pids, g_pids, q_cams, g_cams = ranking_problem()
  queries, gallery = [solid(0), solid(50)], [solid(20 * i) for i in range(5)]
  ranked, _ = evaluation.top_k(qf, gf, TOPK, q_pids=q_pids, g_pids=g_pids, q_camids=q_cams, g_camids=g_cams)
  from_lists = visualize.visrank(None, q_pids, g_pids, q_cams, g_cams, queries, gallery, str(tmp_path / "a"),
                                 topk=TOPK, height=HEIGHT, width=WIDTH, ranked=ranked)
  from_matrix = visualize.visrank(evaluation.distance_matrix(qf, gf), q_pids, g_pids, q_cams, g_cams, queries,
                                  gallery, str(tmp_path / "b"), topk=TOPK, height=HEIGHT, width=WIDTH)
  for a, b in zip(from_lists, from_matrix):
    np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
  with pytest.raises(ValueError, match="`ranked`"):
    visualize.visrank(None, q_pids, g_pids, q_cams, g_cams, queries, gallery, str(tmp_path))


def test_visrank_from_paths(tmp_path):
  paths = []
  for i in range(7):
    path = tmp_path / "images" / f"{i:04d}_c1_x.jpg"
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(solid(30 * i)).save(path)
    paths.append(str(path))
  written = visualize.visrank(*ranking_problem(), paths[:2], paths[2:], str(tmp_path / "out"), topk=TOPK,
                              height=HEIGHT, width=WIDTH)
  assert [p.rsplit("/", 1)[1] for p in written] == ["0000_c1_x.png", "0001_c1_x.png"]
  picture = np.asarray(Image.open(written[0]))
  assert picture.shape == (HEIGHT, (TOPK + 1) * WIDTH + TOPK * visualize.RANK_SPACING
                           + visualize.QUERY_SPACING, 3)
  assert frame_colour(picture, 0) == visualize.QUERY_FRAME
  assert [frame_colour(picture, r) for r in (1, 2, 3)] == [visualize.MATCH_FRAME, visualize.MISMATCH_FRAME,
                                                           visualize.MATCH_FRAME]
  # the image itself sits inside the frame: the centre of rank 1 is gallery image 0 (value 60)
  centre = picture[HEIGHT // 2, WIDTH + visualize.RANK_SPACING + visualize.QUERY_SPACING + WIDTH // 2]
  np.testing.assert_array_equal(centre, [60, 60, 60])


def test_visrank_from_arrays_grouped(tmp_path):
  queries = np.stack([np.full((20, 10, 3), -1.0), np.full((20, 10, 3), 1.0)]).astype(np.float32)
  gallery = [solid(10 * i) for i in range(5)]
  written = visualize.visrank(*ranking_problem(), queries, gallery, str(tmp_path), topk=2, height=HEIGHT,
                              width=WIDTH, queries_per_file=2)
  assert len(written) == 1 and written[0].endswith("visrank_0000.png")
  picture = np.asarray(Image.open(written[0]))
  assert picture.shape[0] == 2 * HEIGHT + visualize.RANK_SPACING
  assert tuple(picture[HEIGHT // 2, WIDTH // 2]) == (0, 0, 0)  # query 0 was all -1
  assert tuple(picture[HEIGHT + visualize.RANK_SPACING + HEIGHT // 2, WIDTH // 2]) == (255, 255, 255)


def test_visrank_checks_inputs(tmp_path):
  with pytest.raises(ValueError, match="query and"):
    visualize.visrank(*ranking_problem(), [solid(0)], [solid(0)] * 5, str(tmp_path))
  with pytest.raises(ValueError, match="query_indices"):
    visualize.visrank(*ranking_problem(), [solid(0)] * 2, [solid(0)] * 5, str(tmp_path), query_indices=[5])


def test_save_image_grid(tmp_path):
  source = -np.ones((3, 8, 4, 3), np.float32)
  translated = np.zeros((3, 8, 4, 3), np.float32)
  target = np.ones((2, 8, 4, 3), np.float32)  # rows may be shorter
  path = visualize.save_image_grid([source, translated, target], str(tmp_path / "samples" / "s.png"),
                                   padding=1)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (3 * 9 + 1, 3 * 5 + 1, 3)
  assert grid[1, 1, 0] == 0 and grid[10, 1, 0] == 128 and grid[19, 1, 0] == 255
  assert grid[19, 11, 0] == 0  # the missing third target image stays black
  with pytest.raises(ValueError, match="one image size"):
    visualize.save_image_grid([source, np.zeros((1, 4, 4, 3))], str(tmp_path / "bad.png"))


def test_to_uint8():
  np.testing.assert_array_equal(visualize.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
  assert visualize.to_uint8(np.zeros(2, np.uint8)).dtype == np.uint8
