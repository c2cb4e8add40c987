// difract-ext: an image panel for attribution graphs of FLUX denoising steps.
//
// Shows the generated image with the patch grid over it and colours the patches:
//  - nothing selected: how many graph nodes sit on each patch;
//  - a node hovered or clicked: the summed weight of its incoming edges per source patch
//    (green positive, purple negative, as the link colours), its own patch outlined.
// Text positions get the same numbers as a bar list under the image.
// Reads graph metadata written by difract_ext.graphs.files: grid, positions (one entry per
// shown column: {pos, kind, row, col, label}), image (file name beside the graph JSON),
// prompt, step, num_inference_steps, timestep, seed.
window.initDifractImage = function ({visState, renderAll, data, cgSel}) {
  var sel = cgSel.select('.difract-image').html('')
  if (!sel.node()) return
  var meta = data.metadata
  var positions = meta.positions || []
  var grid = meta.grid || [0, 0]
  var nRows = grid[0], nCols = grid[1]

  // DOM markers that tests and scripts can read
  document.body.dataset.difractSlug = meta.slug
  document.body.dataset.difractNodes = String(data.nodes.length)

  var header = sel.append('div.difract-header')
  header.append('div.difract-title').text(
    'step ' + meta.step + (meta.num_inference_steps ? '/' + meta.num_inference_steps : '') +
    ' · t=' + (typeof meta.timestep === 'number' ? meta.timestep.toFixed(3) : '?') +
    (meta.seed !== undefined && meta.seed !== null ? ' · seed ' + meta.seed : ''))
  header.append('div.difract-prompt').text(meta.prompt || '').at({title: meta.prompt || ''})

  var box = sel.append('div.difract-image-box')
    .st({aspectRatio: nCols && nRows ? nCols + ' / ' + nRows : '1 / 1'})
  if (meta.image) {
    box.append('img.difract-generated').at({src: './graph_data/' + meta.image, alt: 'generated image'})
  }
  var svg = box.append('svg.difract-patches')
    .at({viewBox: '0 0 ' + Math.max(nCols, 1) + ' ' + Math.max(nRows, 1), preserveAspectRatio: 'none'})

  var patches = d3.range(nRows * nCols).map(i => ({row: Math.floor(i / nCols), col: i % nCols}))
  var patchSel = svg.appendMany('rect.patch', patches)
    .at({x: d => d.col, y: d => d.row, width: 1, height: 1})
  patchSel.append('title')
  var outline = svg.append('rect.difract-outline').at({width: 1, height: 1, display: 'none'})

  var caption = sel.append('div.difract-caption')
  var tokenSel = sel.append('div.difract-tokens')

  var idToNode = data.nodes.idToNode || {}
  var greenPurple = v => d3.interpolatePRGn(0.5 + 0.5 * d3.clamp(-1, v, 1))

  function positionOf(node) {
    return node ? positions[node.ctx_idx] : undefined
  }

  function selectedNode() {
    return idToNode[visState.hoveredNodeId] || idToNode[visState.clickedId] || null
  }

  // value per shown column (ctx_idx) for the current mode
  function columnValues(node) {
    var values = new Map()
    if (!node) {
      data.nodes.forEach(d => {
        if (d.feature_type === 'logit') return
        values.set(d.ctx_idx, (values.get(d.ctx_idx) || 0) + 1)
      })
      return values
    }
    ;(node.sourceLinks || []).forEach(link => {
      var ctx = link.sourceNode.ctx_idx
      values.set(ctx, (values.get(ctx) || 0) + link.weight)
    })
    return values
  }

  function render() {
    var node = selectedNode()
    var values = columnValues(node)
    var byPatch = new Map()
    var textRows = []
    values.forEach((v, ctx) => {
      var p = positions[ctx]
      if (!p) return
      if (p.kind === 'img') byPatch.set(p.row * nCols + p.col, v)
      else if (p.kind === 'txt') textRows.push({label: p.label, value: v, pos: p.pos})
    })
    var maxAbs = d3.max(Array.from(values.values()), Math.abs) || 1

    patchSel
      .at({
        fill: (d, i) => {
          if (!byPatch.has(i)) return 'none'
          var v = byPatch.get(i) / maxAbs
          return node ? greenPurple(v) : d3.interpolateOranges(0.25 + 0.75 * v)
        },
        fillOpacity: (d, i) => byPatch.has(i) ? 0.6 : 0,
      })
      .select('title')
      .text((d, i) => 'img r' + d.row + 'c' + d.col +
        (byPatch.has(i) ? (node ? ': ' + d3.format('+.3f')(byPatch.get(i)) : ': ' + byPatch.get(i) + ' nodes') : ''))

    var own = positionOf(node)
    if (own && own.kind === 'img') outline.at({x: own.col, y: own.row, display: null})
    else outline.at({display: 'none'})

    caption.text(node
      ? 'inputs to ' + (node.ppClerp || node.clerp || node.nodeId) + ', summed per source position'
      : 'graph nodes per position (hover or click a node to see its inputs)')

    textRows = d3.sort(textRows, d => d.pos)
    var rowSel = tokenSel.html('').appendMany('div.difract-token', textRows)
    rowSel.append('span.difract-token-label').text(d => d.label)
    rowSel.append('span.difract-token-bar').st({
      width: d => Math.round(60 * Math.abs(d.value) / maxAbs),
      background: d => node ? greenPurple(d.value / maxAbs) : d3.interpolateOranges(0.6),
    })
    rowSel.append('span.difract-token-value')
      .text(d => node ? d3.format('+.3f')(d.value) : d.value)
  }

  renderAll.clickedId.fns['difractImage'] = render
  renderAll.hoveredId.fns['difractImage'] = render
  render()
}

window.init?.()
