// difract-ext: names, bands and the layout of attribution graphs of FLUX denoising steps.
//
// One name per node everywhere (graph tooltip, connection lists, feature pane, image panel):
//   feature  img_1 #248 @ r3c5 "colour=red"   (site #index @ position "label")
//   error    err img L1 @ r3c5
//   residue  residue img L1 @ r3c5
//   input    emb @ t3:red
//   target   Target "x0·red @ left" = +0.73
// Graph files written by difract_ext.graphs.files carry the fields this reads: node.difract
// {site, stream, layer, feature, position, token, patch}, node.difract_target {label, value,
// weight}, metadata.positions [{pos, kind, label, row, col}], metadata.n_double.
window.difract = (function () {
  function position(meta, ctx) {
    return (meta.positions || [])[ctx]
  }

  // short position: r3c5 for a patch, t3:red for a text token
  function posShort(p) {
    if (!p) return '?'
    if (p.kind === 'img') return 'r' + p.row + 'c' + p.col
    if (p.kind === 'txt') {
      var m = /"(.*)"$/.exec(p.label || '')
      return 't' + p.pos + (m ? ':' + m[1] : '')
    }
    return p.label || ''
  }

  function layerOf(d) {
    return parseInt(String(d.node_id || '').split('_')[0])
  }

  function streamOf(d, meta) {
    if (d.difract) return d.difract.stream
    var p = position(meta, d.ctx_idx)
    var layer = layerOf(d)
    if (meta.n_double !== undefined && layer >= meta.n_double) return 'joint'
    return p && p.kind === 'txt' ? 'txt' : 'img'
  }

  // the label part of a feature's name: an edited label, else the dashboard label (clerp)
  function featureLabel(d, edited) {
    if (edited) return edited
    var base = d.difract ? d.difract.site + ' #' + d.difract.feature : null
    return d.clerp && d.clerp !== base ? d.clerp : null
  }

  function name(d, meta, edited) {
    if (!d) return ''
    var p = position(meta, d.ctx_idx)
    var at = ' @ ' + posShort(p)
    var ft = d.feature_type
    if (ft === 'logit') return d.clerp || 'Target'
    if (ft === 'embedding') return 'emb' + at
    var stream = streamOf(d, meta)
    var layer = layerOf(d)
    var where = (stream === 'joint' ? '' : stream + ' ') + 'L' + layer
    if (ft === 'mlp reconstruction error') return 'err ' + where + at
    if (ft === 'unexplored feature residue') return 'residue ' + where + at
    if (d.difract) {
      var label = featureLabel(d, edited)
      return d.difract.site + ' #' + d.difract.feature + at + (label ? ' "' + label + '"' : '')
    }
    return d.clerp || d.node_id
  }

  // a node's horizontal band: emb at the bottom, then per layer txt / img (or the joint stream of
  // single blocks), targets on top
  function band(d, meta) {
    if (d.feature_type === 'embedding') return {key: 'emb', order: -1, label: 'Emb'}
    if (d.feature_type === 'logit') return {key: 'targets', order: 1e9, label: 'Targets'}
    var layer = layerOf(d)
    var stream = streamOf(d, meta)
    var sub = stream === 'txt' ? 0 : stream === 'img' ? 1 : 2
    return {
      key: stream + layer,
      order: layer * 3 + sub,
      label: (stream === 'joint' ? '' : stream + ' ') + 'L' + layer,
    }
  }

  // group consecutive shown positions of a kind when they cannot each get minW pixels
  function groupColumns(meta, nCols, width, minW) {
    var positions = meta.positions || []
    var cols = d3.range(nCols).map(i => positions[i] || {kind: 'other', label: String(i)})
    var key = (p, gt, gr) => p.kind === 'txt' ? 'txt' + Math.floor(p.pos / gt)
      : p.kind === 'img' ? 'img' + Math.floor(p.row / gr) : p.kind + p.pos
    var budget = Math.max(2, Math.floor(width / minW))
    var gt = 1, gr = 0  // gr = 0: one column per patch
    function build() {
      var groups = []
      cols.forEach((p, i) => {
        var k = gr === 0 && p.kind === 'img' ? 'imgp' + i : key(p, gt, gr || 1)
        var last = groups[groups.length - 1]
        if (last && last.key === k) last.members.push(i)
        else groups.push({key: k, kind: p.kind, members: [i]})
      })
      return groups
    }
    var groups = build()
    while (groups.length > budget) {
      var nTxt = groups.filter(g => g.kind === 'txt').length
      var nImg = groups.filter(g => g.kind === 'img').length
      if (nImg >= nTxt && gr === 0) gr = 1
      else if (nImg >= nTxt) gr *= 2
      else gt *= 2
      groups = build()
      if (gt > 1e6 || gr > 1e6) break
    }
    var grouped = groups.some(g => g.members.length > 1)
    groups.forEach(g => {
      var first = cols[g.members[0]], last = cols[g.members[g.members.length - 1]]
      if (g.members.length === 1) g.label = first.label
      else if (g.kind === 'txt') g.label = 'txt ' + first.pos + '–' + last.pos
      else if (g.kind === 'img') g.label = first.row === last.row ? 'img r' + first.row
        : 'img r' + first.row + '–' + last.row
      else g.label = first.label
    })
    return {groups, grouped}
  }

  // x/y position of every node: a grid of (column group × band) cells, each cell laid out as a
  // small grid of its nodes (most influential first), so nodes never share a spot
  function layout(nodes, meta, width, height) {
    var nCols = (meta.prompt_tokens || []).length
    var {groups, grouped} = groupColumns(meta, nCols, width, 14)
    var colToGroup = {}
    groups.forEach((g, i) => g.members.forEach(c => colToGroup[c] = i))

    var bandMap = new Map()
    nodes.forEach(d => {
      var b = band(d, meta)
      if (!bandMap.has(b.key)) bandMap.set(b.key, {...b, cells: new Map()})
      d.difractBand = b.key
      d.difractGroup = colToGroup[d.ctx_idx] ?? groups.length - 1
      var cells = bandMap.get(b.key).cells
      if (!cells.has(d.difractGroup)) cells.set(d.difractGroup, [])
      cells.get(d.difractGroup).push(d)
    })
    var bands = d3.sort(Array.from(bandMap.values()), b => b.order)

    // columns: width ~ sqrt of the fullest cell, gaps between position kinds
    var gap = 10
    var need = groups.map((g, i) => d3.max(bands, b => (b.cells.get(i) || []).length) || 0)
    var weights = need.map(n => 1 + Math.sqrt(n))
    var nGaps = groups.filter((g, i) => i && g.kind !== groups[i - 1].kind).length
    var scale = (width - gap * nGaps) / (d3.sum(weights) || 1)
    var x = 0
    groups.forEach((g, i) => {
      if (i && g.kind !== groups[i - 1].kind) x += gap
      g.x0 = x
      g.width = weights[i] * scale
      x += g.width
    })

    // bands: height ~ 1 + log2 of the sub-rows their fullest cell needs at ~10 px spacing
    bands.forEach(b => {
      var rows = d3.max(Array.from(b.cells.entries()), ([gi, cell]) =>
        Math.ceil(cell.length / Math.max(1, Math.floor(groups[gi].width / 10)))) || 1
      b.weight = (b.key === 'emb' || b.key === 'targets' ? 0.7 : 1) * (1 + Math.log2(rows))
    })
    var yScale = height / d3.sum(bands, b => b.weight)
    var y = height
    bands.forEach(b => {
      b.height = b.weight * yScale
      b.y1 = y
      b.y0 = y - b.height
      y = b.y0
    })

    var spacing = Infinity
    bands.forEach(b => b.cells.forEach((cell, gi) => {
      var g = groups[gi]
      // one position: most influential first; a group of positions: in position order
      cell = g.members.length > 1
        ? d3.sort(cell, d => d.ctx_idx, d => d.influence ?? 1)
        : d3.sort(cell, d => d.feature_type === 'logit' ? 0 : (d.influence ?? 1))
      var perRow = b.key === 'targets' ? 1 : Math.max(1, Math.min(cell.length, Math.floor(g.width / 10)))
      var rows = Math.ceil(cell.length / perRow)
      // square-ish grids when the band is tall enough
      while (rows > 1 && perRow > 1 && (g.width / perRow) < (b.height / rows) / 2) {
        perRow = Math.max(1, perRow - 1)
        rows = Math.ceil(cell.length / perRow)
      }
      var sx = g.width / perRow, sy = b.height / rows
      spacing = Math.min(spacing, sx, sy)
      cell.forEach((d, i) => {
        var r = Math.floor(i / perRow), k = i % perRow
        d.pos = [g.x0 + (k + 0.5) * sx, b.y0 + (r + 0.5) * sy]
      })
    }))
    var fontSize = Math.max(5, Math.min(10, spacing * 0.9))
    return {groups, grouped, bands, fontSize}
  }

  // keep labels whose extent along the axis does not meet the last kept one's
  function thinLabels(items, coord, size) {
    var last = -Infinity
    items.forEach(d => {
      d.keep = coord(d) - last >= size
      if (d.keep) last = coord(d)
    })
  }

  var listing = null
  function dashboardListing() {
    if (!listing) {
      listing = fetch('./dashboards/index.json', {cache: 'no-cache'})
        .then(r => r.ok ? r.json() : {scans: {}})
        .catch(() => ({scans: {}}))
    }
    return listing
  }

  // the dashboard scan of a graph: metadata.dashboards, its scan, or a scan of the same model
  async function dashboardScan(meta) {
    var {scans} = await dashboardListing()
    if (meta.dashboards && scans[meta.dashboards]) return meta.dashboards
    if (scans[meta.scan]) return meta.scan
    return Object.keys(scans).find(s => scans[s].model && scans[s].model === meta.model_name)
  }

  return {position, posShort, name, band, layout, groupColumns, thinLabels, streamOf, layerOf,
    featureLabel, dashboardListing, dashboardScan}
})()
